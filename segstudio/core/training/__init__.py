"""Training: the one loop (``loop``) that training from scratch (``train``), fine-tuning (``finetune``) and
distillation (:mod:`segstudio.core.optimize.distill`) share; labelled datasets (``datasets``), synthetic images
with known answers (``synthetic``) and training curves (``plots``).
"""
