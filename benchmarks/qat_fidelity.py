"""How close the INT8 model's outputs stay to FP32's after PTQ, and after a short QAT on the same graph.

    python benchmarks/qat_fidelity.py --data ../shared/data/dsb2018 --lr 1e-6 4e-6 1.5e-5 4e-5

Calibration: 64 tiles (128 px) of the first 40 fluorescence images of DSB2018 ``train``; held out: 24
tiles of the first 20 of ``val``.  PTQ: :func:`~segstudio.core.optimize.quantize.quantize_int8`.  QAT:
:func:`~segstudio.core.optimize.qat.qdq_net` on that INT8 graph, ``--steps`` steps of 8 tiles, MSE to the
FP32 network's logits, AdamW with a one-cycle schedule at each ``--lr``, then exported and run by ONNX
Runtime.  Prints the mean |INT8 - FP32| of the logits on the held-out tiles (lower is closer); not AP50.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort
    import torch

    from segstudio.core.image.sources import read_image
    from segstudio.core.models.catalog import get_model
    from segstudio.core.models.unet import fold_batchnorm
    from segstudio.core.optimize.artifact import load_torch
    from segstudio.core.optimize.calibration import CalibrationSource
    from segstudio.core.optimize.qat import qdq_net
    from segstudio.core.optimize.quantize import quantize_int8
    from segstudio.core.training.loop import TrainLoop

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the DSB2018 folder (index.json, train/, val/)")
    p.add_argument("--model", default="nuclei")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lr", type=float, nargs="+", default=[4e-5])
    p.add_argument("--out", type=Path, default=Path("/tmp/segstudio-qat-fidelity"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    index = [e for e in json.loads((args.data / "index.json").read_text()) if e["kind"] == "fluorescence"]

    def images(split: str, n: int):
        paths = [args.data / f"{e['file']}_img.tif" for e in index if e["file"].startswith(split)]
        return [read_image(q) for q in paths[:n]]

    model = get_model(args.model)
    train = CalibrationSource(images("train", 40), model.spec, n_tiles=64, tile=128).tiles()
    val = CalibrationSource(images("val", 20), model.spec, n_tiles=24, tile=128, seed=1).tiles()
    ptq = quantize_int8(model.file("onnx"), args.out / "ptq.onnx", train)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3

    def outputs(path):
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return [s.run(None, {s.get_inputs()[0].name: t})[0] for t in val]

    reference = outputs(model.file("onnx"))

    def error(path) -> float:
        return float(np.mean([np.abs(a - b).mean() for a, b in zip(outputs(path), reference)]))

    print(f"PTQ: held-out mean |INT8 - FP32| {error(ptq):.4f}")
    teacher = fold_batchnorm(load_torch(model)).eval()
    x = torch.from_numpy(np.concatenate(train))
    with torch.no_grad():
        y = teacher(x)
    for lr in args.lr:
        net = qdq_net(ptq, model.file("onnx"))
        loop = TrainLoop(net.parameters(), lr, weight_decay=0.0, total_steps=args.steps)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            i = torch.from_numpy(rng.choice(len(x), 8, replace=False))
            loop.step(((net(x[i]) - y[i]) ** 2).mean())
        path = net.export(args.out / f"qat-{lr:g}.onnx")
        print(f"QAT lr {lr:g}, {args.steps} steps in {time.perf_counter() - t0:.0f} s: held-out mean "
              f"|INT8 - FP32| {error(path):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
