"""Train, tune, export and evaluate a built-in nuclei model.

Reproduces the shipped ``nuclei`` model (seeded; on the 2-core CPU of the
development machine it takes the time written in the model card):

    python scripts/train_builtin.py --data ../shared/data/dsb2018

Steps: train on the fluorescence ``train`` split minus every 10th image,
which is held out to tune the post-processing thresholds; save the state
dict; export ONNX and verify it against PyTorch; evaluate on the
fluorescence ``val`` split with the same code as ``segstudio eval``; write
the model card.  A killed run resumes from ``--workdir``.
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

from segstudio.core.datasets import find_pairs  # noqa: E402
from segstudio.core.evaluate import evaluate_job  # noqa: E402
from segstudio.core.jobs import run_sync  # noqa: E402
from segstudio.core.models.catalog import BUILTIN_DIR, get_model, write_card  # noqa: E402
from segstudio.core.models.onnx_export import compare_outputs, export_onnx  # noqa: E402
from segstudio.core.models.spec import ModelSpec, PostprocessParams, UNetConfig  # noqa: E402
from segstudio.core.tiling import predict_tiled  # noqa: E402
from segstudio.core.train import TrainConfig, config_dict, load_samples, train_job, tune_postprocess  # noqa: E402


def log(event) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {event.stage} {event.done}/{event.total} {event.message}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="folder with train/, val/ and index.json")
    ap.add_argument("--name", default="nuclei")
    ap.add_argument("--version", default="1.0")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--separable", action="store_true")
    ap.add_argument("--crop", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--diameter", type=float, default=None,
                    help="resample every image so its nuclei are this many pixels across (default: native pixels)")
    ap.add_argument("--zoom", type=float, nargs=2, default=(0.7, 1.4))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "nuclei")
    ap.add_argument("--out", type=Path, default=BUILTIN_DIR)
    args = ap.parse_args()

    import torch

    cfg = TrainConfig(
        unet=UNetConfig(in_channels=1, out_channels=2, depth=args.depth, width=args.width, separable=args.separable),
        epochs=args.epochs, crop=args.crop, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        diameter=args.diameter, zoom=tuple(args.zoom),
        threads=args.threads,
    )
    pairs = find_pairs(args.data / "train", args.data / "train", kind="fluorescence")
    tune_pairs = pairs[::10]
    train_pairs = [p for i, p in enumerate(pairs) if i % 10]
    print(f"train {len(train_pairs)} images, tune {len(tune_pairs)} images", flush=True)
    train = load_samples(train_pairs, cfg.normalization, cfg.unet.in_channels, cfg.diameter)
    tune = load_samples(tune_pairs, cfg.normalization, cfg.unet.in_channels)

    result = run_sync(train_job(train, cfg, args.workdir), log)
    net = result["net"]

    spec = ModelSpec(
        name=args.name, version=args.version,
        title="Nuclei in fluorescence images (U-Net, foreground + distance, watershed)",
        description="2-D nuclei in fluorescence microscopy (DAPI / Hoechst-like stains), one channel.",
        config=cfg.unet, input_channels=cfg.unet.in_channels, normalization=cfg.normalization,
        trained_on=f"DSB2018 stage 1 (BBBC038, CC0), fluorescence train split: {len(train_pairs)} images "
        f"({len(tune_pairs)} more held out to tune thresholds)",
        license="CC0 training data; model weights released with segstudio",
    )

    # post-processing thresholds on held-out training images
    with torch.inference_mode():
        def predict(b):
            return net(torch.from_numpy(b)).numpy()
        outputs = [
            run_sync(predict_tiled(s.image, predict, tile=512, halo=spec.halo, multiple=cfg.unet.multiple))
            for s in tune
        ]
    params, tune_ap = tune_postprocess(outputs, [s.labels for s in tune], PostprocessParams())
    spec.postprocess = params
    print(f"tuned post-processing: {params} (AP50 {tune_ap:.3f} on the tune images)", flush=True)

    diam = [2 * np.sqrt(np.bincount(s.labels.ravel())[1:] / np.pi) for s in train]
    diam = np.concatenate([d[d > 0] for d in diam])
    spec.median_diameter_px = round(float(np.median(diam)), 1)
    spec.pixel_scale = (
        f"native DSB2018 pixels (no physical size given); nuclei {np.percentile(diam, 5):.0f}-"
        f"{np.percentile(diam, 95):.0f} px across (5th-95th percentile), median {spec.median_diameter_px} px; "
        f"trained with zoom {cfg.zoom[0]}-{cfg.zoom[1]}x"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    pt = args.out / f"{args.name}.pt"
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, pt)
    onnx_path = export_onnx(net, args.out / f"{args.name}.onnx", in_channels=1, multiple=cfg.unet.multiple)

    import onnxruntime as ort

    x = np.stack([tune[0].image[:, :256, :256], tune[1].image[:, :256, :256]]).astype(np.float32)
    with torch.inference_mode():
        ref = net(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_check = compare_outputs(ref, sess.run(None, {sess.get_inputs()[0].name: x})[0])
    print(f"ONNX vs PyTorch: {onnx_check}", flush=True)

    spec.training = {
        "command": "python scripts/train_builtin.py --data ../shared/data/dsb2018"
        + ("" if args.epochs == 100 else f" --epochs {args.epochs}")
        + ("" if args.width == 16 else f" --width {args.width}"),
        "config": config_dict(cfg),
        "seconds": round(result["seconds"]),
        "machine": "2-core AMD EPYC (AVX2), CPU only, torch " + torch.__version__,
        "final_loss": result["history"][-1]["loss"],
        "tune_ap50": round(tune_ap, 4),
        "onnx_vs_torch": onnx_check,
    }
    card = write_card(spec, {"torch": pt, "onnx": onnx_path}, args.out / f"{args.name}.json")

    # evaluation on val, as `segstudio eval` does it
    from segstudio.core.backends import create_backend

    model = get_model(card)
    val = find_pairs(args.data / "val", args.data / "val", kind="fluorescence")
    with create_backend("onnxruntime", model) as backend:
        report = run_sync(evaluate_job(val, model, backend))
    mean = report["mean"]
    spec.metrics = {
        "dsb2018_fluorescence_val": {
            "images": len(val),
            "ap50": round(mean["ap50"], 4), "ap75": round(mean["ap75"], 4), "f1": round(mean["f1"], 4),
            "dice": round(mean["dice"], 4), "pq": round(mean["pq"], 4),
            "count_error": round(mean["count_error"], 4),
            "ap": {k: round(v, 4) for k, v in mean["ap"].items()},
            "command": "segstudio eval --model nuclei --images ../shared/data/dsb2018/val "
            "--labels ../shared/data/dsb2018/val --kind fluorescence",
        }
    }
    write_card(spec, {"torch": pt, "onnx": onnx_path}, card)
    print(json.dumps(spec.metrics, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
