"""The Segment panel's Open... flow: files with code are refused unless the user ticks the box, which warns."""

from __future__ import annotations

import numpy as np
import pytest

from segstudio.core.image.io import as_image
from segstudio.qt.segment_panel import SegmentPanel

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.gui

TIMEOUT_MS = 300_000  # a conversion on a busy 2-core machine


@pytest.fixture
def panel(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("SEGSTUDIO_HOME", str(tmp_path / "home"))
    image = as_image(np.zeros((32, 32), np.uint8), "YX", name="blank")
    widget = SegmentPanel(lambda: image)
    qtbot.addWidget(widget)
    return widget


@pytest.fixture
def torchscript(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1))
    f = tmp_path / "net.pt"
    torch.jit.script(net).save(str(f))
    return f


def test_a_torchscript_file_is_refused_until_the_box_is_ticked(panel, qtbot, torchscript):
    count = panel.model_combo.count()
    assert not panel.trust_check.isChecked() and not panel.trust_warning.isVisibleTo(panel)
    with qtbot.waitSignal(panel.import_runner.stopped, timeout=TIMEOUT_MS):
        panel.open_model(str(torchscript))
    assert "refused net.pt: it is a TorchScript archive, which holds code that runs when it is loaded" in \
        panel.error_text()
    assert "the checkbox under Open..." in panel.error_text()  # the hint says what to do
    assert panel.model_combo.count() == count and panel.open_model_button.isEnabled()

    panel.trust_check.setChecked(True)
    warning = panel.trust_warning.text()
    assert panel.trust_warning.isVisibleTo(panel)
    assert warning.startswith("Warning: a TorchScript file is a program. Allow it only from people you trust.")
    assert "in a separate process and keeps only the ONNX file" in warning
    from segstudio.core.models.confine import describe_confinement

    assert warning.endswith(f"Here: {describe_confinement()}.")  # what this machine gives the conversion
    with qtbot.waitSignal(panel.import_runner.stopped, timeout=TIMEOUT_MS):
        panel.open_model(str(torchscript))
    assert panel.error_text() == ""
    assert panel.model_combo.count() == count + 1 and panel.model_combo.currentText().startswith("net (")
    model = panel._models[panel.model_name]
    assert model.provenance["converted"]["in"] == "a confined child process" and set(model.files) == {"onnx"}
    panel.trust_check.setChecked(False)
    assert not panel.trust_warning.isVisibleTo(panel)
