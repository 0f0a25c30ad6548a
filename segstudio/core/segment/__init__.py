"""The segmentation path: image in, instance labels and a per-cell table out.

``options`` (what can be asked: :class:`SegmentOptions`, :class:`Diameter`),
``preprocess`` (channels, percentile normalization), ``scale`` (the nuclei's
size, the one resampled grid per plane), ``tiling``, ``pipeline`` (the
streaming stages of one plane), ``postprocess`` (network outputs to
instances), ``measure`` (the per-cell table), ``_kernels`` (compiled
loops), and ``job``: the public :func:`segment_job`.
"""

_PUBLIC = {"Diameter": "options", "SegmentOptions": "options", "SegmentationResult": "job", "segment_job": "job",
           "segment_to_files": "job", "warm_up": "job"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """The public names, imported when first asked for (importing the package imports none of its modules)."""
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
