"""Jobs over many images built on the segmentation path: folders in batch (``batch``), accuracy against labels
(``evaluate``), speed side by side (``benchmark``), two models on one image (``compare``).
"""
