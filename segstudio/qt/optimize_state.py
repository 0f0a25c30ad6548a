"""What the optimization wizard's pages choose, in one plain object.

Pages 1 to 4 (:mod:`segstudio.qt.optimize_wizard`) fill a
:class:`WizardState`; pages 5 and 6 (:mod:`segstudio.qt.optimize_run`,
:mod:`segstudio.qt.optimize_result`) read it.  It holds core objects only
(a :class:`~segstudio.core.models.catalog.Model`, a
:class:`~segstudio.core.optimize.calibration.CalibrationSource`, a
:class:`~segstudio.core.optimize.validate.ValidationSet`, the
:class:`~segstudio.core.optimize.steps.Step` list, a
:class:`~segstudio.core.optimize.estimate.RunEstimate`) and the shell's
hooks, so the wizard knows neither napari nor the window it is docked in:

``layer_images() -> [(data, axes, name)]``
    the open image layers (napari's, in both shells);
``layer_labels() -> [(data, name)]``
    the open Labels layers;
``current_image() -> ImageData | None``
    the image the result page's *Compare on this image* runs on;
``add_labels(data, name, colors)``
    show labels (``colors``: label value -> colour name or RGBA, or None);
``use_model(model_or_card)``
    set by the wizard: keep a model as a user model and announce it
    (:attr:`OptimizeWizard.model_added`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.errors import log_dir
from ..core.image.io import ImageData
from ..core.models.catalog import Model
from ..core.optimize.calibration import CalibrationSource
from ..core.optimize.estimate import RunEstimate
from ..core.optimize.steps import Step
from ..core.optimize.validate import ValidationSet

LayerImages = Callable[[], list[tuple[np.ndarray, "str | None", str]]]
LayerLabels = Callable[[], list[tuple[np.ndarray, str]]]


def optimize_root() -> Path:
    """Where the wizard's runs go unless the user says otherwise: ``$SEGSTUDIO_HOME/optimize``."""
    return log_dir().parent / "optimize"


def default_out_dir(model_name: str = "model") -> Path:
    """A fresh folder for a run of ``model_name``: ``<optimize root>/<model>-<date>-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = optimize_root() / f"{model_name}-{stamp}"
    n = 2
    while out.exists():
        out = optimize_root() / f"{model_name}-{stamp}-{n}"
        n += 1
    return out


@dataclass
class WizardState:
    """The wizard's choices (see the module docstring)."""

    model: Model | None = None
    target: str = "cpu"  # "cpu" or "gpu"
    backends: list[str] = field(default_factory=list)  # variants that run the model on the target, best first
    calib: CalibrationSource | None = None
    calib_description: str = ""  # "26 tiles of 256 px from 4 images"
    vset: ValidationSet | None = None
    labelled: bool = False
    max_drop: float = 0.01
    min_speedup: float = 1.05
    speed_tile: int = 512  # the tile side latencies (and the estimates) are measured on
    preset_key: str | None = "int8"  # None: a recipe edited in the Advanced view
    steps: list[Step] = field(default_factory=list)
    estimate: RunEstimate | None = None
    out_dir: Path = field(default_factory=default_out_dir)
    out_dir_chosen: bool = False  # the user picked out_dir (it no longer follows the model's name)

    # the shell's hooks (see the module docstring)
    layer_images: LayerImages = field(default=lambda: [], repr=False)
    layer_labels: LayerLabels = field(default=lambda: [], repr=False)
    current_image: Callable[[], ImageData | None] = field(default=lambda: None, repr=False)
    add_labels: Callable[[np.ndarray, str, Any], Any] = field(default=lambda data, name, colors=None: None,
                                                              repr=False)
    use_model: Callable[[Any], None] = field(default=lambda model: None, repr=False)

    def follow_model_name(self) -> None:
        """A fresh default output folder named after the chosen model (unless the user chose one)."""
        if not self.out_dir_chosen:
            self.out_dir = default_out_dir(self.model.name if self.model is not None else "model")
