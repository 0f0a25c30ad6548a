"""Fine-tuning on the user's labels: CLI, curves, resume after a cancel, the result as a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from segstudio.core.errors import Cancelled, InputError  # noqa: E402
from segstudio.core.jobs import CancelToken, run_sync  # noqa: E402
from segstudio.core.models.catalog import get_model  # noqa: E402
from segstudio.core.training.datasets import find_pairs  # noqa: E402
from segstudio.core.training.finetune import FinetuneConfig, finetune_job, split_image, split_pairs  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def test_splits():
    train, val = split_pairs(5, 0.2, 0)
    assert len(val) == 1 and len(train) == 4 and not set(train) & set(val)
    with pytest.raises(InputError, match="at least two"):
        split_pairs(1, 0.2, 0)
    parts = split_image(np.zeros((1, 100, 400), np.float32), np.ones((100, 400), np.int32))
    assert len(parts) == 5 and sum(p[0].shape[-1] for p in parts) == 400
    with pytest.raises(InputError, match="too small"):
        split_image(np.zeros((1, 60, 90), np.float32), np.ones((60, 90), np.int32))


def test_finetune_cancel_resume_and_use(tmp_path):
    base = get_model("nuclei")
    pairs = find_pairs(SAMPLE, SAMPLE)[:3]
    out = tmp_path / "my-nuclei"
    cfg = FinetuneConfig(steps=40, eval_every=20, crop=96, batch_size=4, patience=5)
    token = CancelToken()
    events = []

    def on_progress(e):
        events.append(e)
        if e.info.get("val_ap50") is not None and e.done == 20:
            token.cancel()  # cancel after the first validation

    with pytest.raises(Cancelled):
        run_sync(finetune_job(base, pairs, out, cfg, cancel=token), on_progress)
    assert (out / ".finetune" / "checkpoint.pt").is_file() and (out / "training.png").is_file()
    events.clear()
    result = run_sync(finetune_job(base, pairs, out, cfg), events.append)
    assert any("resumed at step 20" in e.message for e in events)
    steps = [h["step"] for h in result["history"]]
    assert steps == [0, 20, 40]  # base score, then one validation per 20 steps, none repeated
    assert result["val_images"] == 1 and result["train_images"] == 2
    assert result["best_val_ap50"] >= result["base_val_ap50"]  # never worse than the base on held-out data
    assert not (out / ".finetune").exists()
    model = get_model(out)
    assert model.name == "my-nuclei" and model.spec.diameter == base.spec.diameter
    assert model.spec.training["fine_tuned_from"].startswith(base.name)
    assert set(model.files) == {"torch", "onnx"}
    from PIL import Image

    assert Image.open(result["png"]).size[0] >= 400


def test_train_cli(tmp_path, capsys):
    from segstudio.cli import main

    out = tmp_path / "ft"
    assert main(["train", "--from", "nuclei", "--images", str(SAMPLE), "--limit", "3", "--out", str(out),
                 "--steps", "20", "--eval-every", "20", "-q"]) == 0
    text = capsys.readouterr().out
    assert "validation AP50" in text and (out / "ft.json").is_file()
    assert main(["segment", str(SAMPLE / "0287e7ee5b00_img.tif"), "--model", str(out), "--out", str(tmp_path / "seg"),
                 "-q"]) == 0
    assert (tmp_path / "seg" / "0287e7ee5b00_img_cells.csv").is_file()
