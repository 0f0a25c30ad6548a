"""Qt panels shared by the napari plugin and the standalone app (qtpy only; never napari)."""

from .segment_panel import BackendCache, ErrorView, SegmentPanel
from .worker import ErrorReport, JobRunner, describe_error, shutdown_all

__all__ = ["BackendCache", "ErrorReport", "ErrorView", "JobRunner", "SegmentPanel", "describe_error", "shutdown_all"]
