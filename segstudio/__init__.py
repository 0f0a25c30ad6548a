"""segstudio: fast microscopy segmentation."""

import os as _os

# ONNX Runtime (1.32 on Linux) starts Microsoft's 1DS usage telemetry when it is imported: a device id
# under ~/.cache/Microsoft/DeveloperTools, an event store, a session file in $TMPDIR, and uploads to
# mobile.events.data.microsoft.com. segstudio sends nothing anywhere, so it is switched off before any
# part of segstudio can import onnxruntime (a user who sets the variable keeps their choice).
# tests/test_hostile.py checks that importing and running it writes nothing outside segstudio's folders.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

from .api import segment  # noqa: E402 - after the environment is set; imports nothing heavy until called

__all__ = ["segment", "__version__"]
