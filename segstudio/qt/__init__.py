"""Qt panels shared by the napari plugin and the standalone app (qtpy only; never napari)."""

from .job_panel import ErrorView, JobPanel
from .segment_panel import BackendCache, SegmentPanel
from .worker import ErrorReport, JobRunner, describe_error, shutdown_all

__all__ = ["BackendCache", "ErrorReport", "ErrorView", "JobPanel", "JobRunner", "SegmentPanel", "describe_error", "shutdown_all"]
