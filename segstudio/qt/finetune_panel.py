""""Fine-tune on these labels": train a model further on an image and the labels the user corrected.

:class:`FinetunePanel` knows neither napari nor files: the shell gives it
``get_data() -> (base model name, [(plane (C, Y, X), labels (Y, X)), ...], name)``
(called on the GUI thread when the user presses the button).  The job
(:func:`segstudio.core.training.finetune.finetune_job`) runs on a background thread;
the panel shows progress, the loss / validation-AP50 curve as it is drawn,
and can cancel.  The new model is written to the user's model folder and
announced with :attr:`FinetunePanel.model_ready` (the card's path).  A
cancelled or interrupted fine-tune resumes from its checkpoint when started
again on the same data.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QPixmap
from qtpy.QtWidgets import QHBoxLayout, QLabel, QSpinBox, QVBoxLayout, QWidget

from ..core.backends import installed, torch_hint
from ..core.jobs import Progress, Stage
from .job_panel import JobPanel
from .worker import describe_error, with_crash_log

GetData = Callable[[], tuple[str, list[tuple[np.ndarray, np.ndarray]], str]]

NO_TORCH = f"Fine-tuning trains the network, which needs PyTorch; this installation has none ({torch_hint()})."


class FinetunePanel(JobPanel):
    """Button, step budget, progress, curve and status of a fine-tune."""

    model_ready = Signal(str)
    CANCELLED = "Cancelled (run again to resume)"

    def __init__(self, get_data: GetData, parent: QWidget | None = None):
        super().__init__("Fine-tune on these labels", parent)
        self._get_data = get_data
        self.run_button.setToolTip("train the chosen model further on this image and its (corrected) labels")
        self.steps = QSpinBox()
        self.steps.setRange(25, 5000)
        self.steps.setSingleStep(25)
        self.steps.setValue(300)
        self.steps.setToolTip("training steps at most (it stops earlier when validation stops improving)")
        self.curve = QLabel()
        self.curve.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.curve.setVisible(False)
        row = QHBoxLayout()
        row.addWidget(self.run_button, 1)
        row.addWidget(QLabel("steps"))
        row.addWidget(self.steps)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        layout.addWidget(self.curve)
        self.last_result: dict | None = None
        self._set_idle()

    def run(self) -> None:
        from ..core.models.catalog import get_model
        from ..core.models.user import safe_name, user_models_dir
        from ..core.training.finetune import FinetuneConfig, finetune_job

        try:
            base_name, arrays, image_name = self._get_data()
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._show_error(exc)
            return
        name = safe_name(f"{base_name}-{image_name}-ft")
        out = user_models_dir() / name
        cfg = FinetuneConfig(steps=int(self.steps.value()))
        self.progress_bar.setRange(0, cfg.steps)
        self.progress_bar.setValue(0)
        self.status.setText(f"Fine-tuning {base_name} on {image_name}...")
        self._set_busy()
        self.runner.start(lambda cancel: finetune_job(get_model(base_name), None, out, cfg, name=name,
                                                      arrays=arrays, cancel=cancel))

    def _on_progress(self, event: Progress) -> None:
        if event.stage is not Stage.FINETUNE:
            return
        self.progress_bar.setValue(min(event.done, self.progress_bar.maximum()))
        if event.message:
            self.status.setText(event.message)
        png = (event.info or {}).get("png")
        if png:
            pixmap = QPixmap(png)
            if not pixmap.isNull():
                self.curve.setPixmap(pixmap.scaledToWidth(min(480, pixmap.width()),
                                                          Qt.TransformationMode.SmoothTransformation))
                self.curve.setVisible(True)

    def _on_finished(self, result: dict) -> None:
        self.last_result = result
        self.progress_bar.setValue(self.progress_bar.maximum())
        verdict = "improved" if result["improved"] else "no gain, the base weights are kept"
        self.status.setText(f"Validation AP50 {result['best_val_ap50']:.3f} (was {result['base_val_ap50']:.3f}): "
                            f"{verdict}. Saved as {result['card'].parent.name}.")
        pixmap = QPixmap(str(result["png"]))
        if not pixmap.isNull():
            self.curve.setPixmap(pixmap.scaledToWidth(min(480, pixmap.width()),
                                                      Qt.TransformationMode.SmoothTransformation))
            self.curve.setVisible(True)
        self.model_ready.emit(str(result["card"]))

    def _on_failed(self, exc: BaseException) -> None:
        self._show_error(exc)

    def _inputs(self) -> list[QWidget]:
        return [self.steps]

    def _show_error(self, exc: BaseException) -> None:
        report = with_crash_log(describe_error(exc))
        self.status.setText(f"Fine-tuning failed: {report.message}" + (f"\n{report.hint}" if report.hint else ""))

    def _set_idle(self) -> None:
        super()._set_idle()
        can_train = installed("torch")
        self.run_button.setEnabled(can_train)
        self.steps.setEnabled(can_train)
        if not can_train:
            self.run_button.setToolTip(NO_TORCH)
            self.status.setText(NO_TORCH)
