"""segstudio: fast microscopy segmentation."""

__version__ = "0.1.0"
