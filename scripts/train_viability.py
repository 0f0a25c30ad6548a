"""Train and measure the built-in live/dead ``viability`` model on synthetic images.

    python scripts/train_viability.py

Images come from :mod:`segstudio.core.training.synthetic` (two channels: a live or
nuclear stain and a dead stain; 1:20 to 20:1 live:dead; see its docstring
for every parameter).  Training seeds 0..N-1; threshold tuning on seeds from
100000; the held-out test set (seeds from 200000) has fixed live fractions
1/21, 1/6, 1/2, 5/6 and 20/21 in both assays, at least 6 images each and
more until the rarer class has 40 cells.  The model card gets per-cell
live / dead F1 (a cell counts when it is found at IoU >= 0.5 *and* given the
right class) per ratio, AP50 and the rest; ``--eval-only`` re-measures a
written model.  Resumes from ``--workdir`` when killed.
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

from segstudio.core.image.io import ImageData  # noqa: E402
from segstudio.core.jobs import run_sync  # noqa: E402
from segstudio.core.models.catalog import BUILTIN_DIR, get_model, write_card  # noqa: E402
from segstudio.core.models.spec import ModelSpec, PostprocessParams, UNetConfig  # noqa: E402
from segstudio.core.segment.preprocess import normalize  # noqa: E402
from segstudio.core.segment.scale import object_diameters  # noqa: E402
from segstudio.core.tasks.evaluate import class_counts, f1_from_counts, mean_scores, score  # noqa: E402
from segstudio.core.training.synthetic import ASSAYS, CLASS_NAMES, DEAD, viability_image  # noqa: E402
from segstudio.core.training.train import (  # noqa: E402
    Sample,
    TrainConfig,
    config_dict,
    distance_target,
    save_model,
    train_job,
    tune_postprocess,
)

TEST_FRACTIONS = (1 / 21, 1 / 6, 1 / 2, 5 / 6, 20 / 21)
# images per (assay, live fraction): at least 6, more until the rarer class has 40 cells (at most 40 images)
TEST_MIN_IMAGES, TEST_MIN_CELLS, TEST_MAX_IMAGES = 6, 40, 40


def log(event) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {event.stage} {event.done}/{event.total} {event.message}", flush=True)


def make_samples(seeds, norm) -> list[Sample]:
    out = []
    for seed in seeds:
        img, lab, cls, _ = viability_image(np.random.default_rng(seed))
        x = normalize(img.astype(np.float32), norm)
        out.append(Sample(f"syn{seed}", x, lab, (lab > 0).astype(np.float32), distance_target(lab),
                          (cls[lab] == DEAD).astype(np.float32)))
    return out


def evaluate(model, backend_name: str = "onnxruntime") -> dict:
    """Per-cell live/dead F1 per (assay, ratio) and overall, and the segmentation metrics."""
    from segstudio.core.backends import create_backend
    from segstudio.core.segment.job import segment_job

    rows, per = [], {}
    with create_backend(backend_name, model) as backend:
        for ai, assay in enumerate(ASSAYS):
            for fi, frac in enumerate(TEST_FRACTIONS):
                counts = {c: {"tp": 0, "fp": 0, "fn": 0} for c in CLASS_NAMES}
                k = 0
                while k < TEST_MIN_IMAGES or (
                    min(counts[c]["tp"] + counts[c]["fn"] for c in CLASS_NAMES) < TEST_MIN_CELLS
                    and k < TEST_MAX_IMAGES
                ):
                    seed = 200_000 + 1000 * ai + 100 * fi + k
                    k += 1
                    img, lab, cls, _ = viability_image(np.random.default_rng(seed), assay=assay, live_fraction=frac)
                    res = run_sync(segment_job(ImageData(img, "CYX", name=f"test{seed}"), model, backend))
                    pred = res.labels.reshape(lab.shape)
                    true_class = {i: CLASS_NAMES[int(c) - 1] for i, c in enumerate(cls) if i}
                    pred_class = dict(zip(res.table["label"].tolist(), res.table["class"].tolist()))
                    c = class_counts(lab, true_class, pred, pred_class, CLASS_NAMES)
                    for name in CLASS_NAMES:
                        for key in ("tp", "fp", "fn"):
                            counts[name][key] += c[name][key]
                    rows.append(score(lab, pred).as_dict())
                ratio = f"{frac / (1 - frac):.3g}:1 live:dead"
                per[f"{assay} {ratio}"] = {
                    "live_f1": round(f1_from_counts(counts["live"]), 4),
                    "dead_f1": round(f1_from_counts(counts["dead"]), 4),
                    "dead_cells": counts["dead"]["tp"] + counts["dead"]["fn"],
                    "live_cells": counts["live"]["tp"] + counts["live"]["fn"],
                    "images": k,
                }
                print(f"{assay:13s} {ratio:18s} {per[f'{assay} {ratio}']}", flush=True)
    mean = mean_scores(rows)
    worst = min(min(v["live_f1"], v["dead_f1"]) for v in per.values())
    return {
        "images": len(rows), "ap50": round(mean["ap50"], 4), "ap75": round(mean["ap75"], 4),
        "f1": round(mean["f1"], 4), "pq": round(mean["pq"], 4), "count_error": round(mean["count_error"], 4),
        "ap": {k: round(v, 4) for k, v in mean["ap"].items()},
        "min_class_f1": worst, "per_ratio": per,
        "command": "python scripts/train_viability.py --eval-only",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=320, help="training images")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--init-from", default=None, help="start from these weights (state dict or checkpoint)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "viability")
    ap.add_argument("--out", type=Path, default=BUILTIN_DIR)
    ap.add_argument("--version", default="2.0", help="version written on the card")
    ap.add_argument("--eval-only", action="store_true", help="measure the written model again")
    args = ap.parse_args()

    if args.eval_only:
        card = args.out / "viability.json"
        model = get_model(card)
        model.spec.metrics = {"synthetic_viability_test": evaluate(model)}
        write_card(model.spec, model.files, card)
        print(json.dumps(model.spec.metrics, indent=1))
        return 0

    import torch

    cfg = TrainConfig(unet=UNetConfig(in_channels=2, out_channels=3, depth=3, width=args.width),
                      epochs=args.epochs, crop=args.crop, zoom=(0.75, 1.33), threads=args.threads, lr=args.lr,
                      init_from=args.init_from)
    train = make_samples(range(args.images), cfg.normalization)
    tune = make_samples(range(100_000, 100_024), cfg.normalization)
    diam = float(np.median(np.concatenate([object_diameters(s.labels) for s in train])))
    result = run_sync(train_job(train, cfg, args.workdir), log)
    net = result["net"]

    spec = ModelSpec(
        name="viability", version=args.version,
        title="Live / dead cells in two-channel fluorescence (U-Net, foreground + distance + class)",
        description="Two channels: a live stain (calcein-AM) or a nuclear stain (Hoechst) first, a dead stain "
        "(propidium iodide, ethidium homodimer) second. Instance labels and a live / dead class per cell.",
        config=cfg.unet, input_channels=2, outputs=("foreground_logit", "distance_logit", "dead_logit"),
        representation="fg_dist_class", normalization=cfg.normalization, classes=CLASS_NAMES,
        diameter=round(diam, 1), median_diameter_px=round(diam, 1),
        pixel_scale=f"trained on cells about {diam:.0f} px across (median); other sizes are resampled to it",
        trained_on=f"{args.images} synthetic images (segstudio.core.training.synthetic, seeds 0-{args.images - 1}): "
        "live-dead and nuclear-dead assays, live:dead 1:20 to 20:1; no real annotated viability data",
        license="weights released with segstudio",
    )
    with torch.inference_mode():
        outputs = [net(torch.from_numpy(s.image[None])).numpy()[0] for s in tune]
    params, tune_ap = tune_postprocess(outputs, [s.labels for s in tune], PostprocessParams())
    spec.postprocess = params
    spec.training = {
        "command": " ".join(["python scripts/train_viability.py", *sys.argv[1:]]),
        "config": config_dict(cfg), "images": args.images,
        "seconds": round(result["seconds"]), "machine": "2-core AMD EPYC (AVX2), CPU only, torch " + torch.__version__,
        "final_loss": result["history"][-1]["loss"], "tune_ap50": round(tune_ap, 4),
        "class_balance": "class BCE weighted by the inverse share of each class's pixels per batch",
    }
    card = save_model(net, spec, args.out, tune[0].image[None, :, :128, :128].copy())
    model = get_model(card)
    spec.metrics = {"synthetic_viability_test": evaluate(model)}
    write_card(spec, model.files, card)
    print(json.dumps(spec.metrics, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
