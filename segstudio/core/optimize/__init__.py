"""The optimization engine: steps that turn a model into a faster one, each validated.

``steps`` (prune, recover, distill, sparsify, export, quantize, engine), the
plain functions behind them (``prune``, ``distill``, ``quantize``), the
user's images (``calibration``), what a step cost and bought (``validate``)
and the runner with its guardrail and reports (``runner``).
"""
