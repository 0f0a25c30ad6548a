"""Train, tune, export and evaluate a built-in nuclei model.

Reproduces the shipped ``nuclei`` model (seeded; on the 2-core CPU of the
development machine it takes the time written in the model card):

    python scripts/train_builtin.py --data ../shared/data/dsb2018

Steps: train on the fluorescence ``train`` split minus every 10th image,
which is held out to tune the post-processing thresholds; save the state
dict; export ONNX and verify it against PyTorch; evaluate on the
fluorescence ``val`` split with the same code as ``segstudio eval``; write
the model card.  A killed run resumes from ``--workdir``.

The shipped models (the exact command is in each card's ``training.command``):

    # nuclei v2.0: width 24, every image resampled to nuclei 20 px across; two stages (the card says why)
    python scripts/train_builtin.py --data ../shared/data/dsb2018 --name nuclei --version 2.0 --width 24 \
        --diameter 20 --zoom 0.75 1.33 --crop 144 --epochs 120 --stop-after 30 --workdir runs/nuclei-v2
    python scripts/train_builtin.py --data ../shared/data/dsb2018 --name nuclei --version 2.0 --width 24 \
        --diameter 20 --zoom 0.75 1.33 --crop 144 --epochs 45 --lr 0.002 \
        --init-from runs/nuclei-v2/checkpoint.pt --workdir runs/nuclei-v2b
    # nuclei-light: width 12, distilled from v2 (logit KD, T=3, alpha=0.5, with the labels)
    python scripts/train_builtin.py --data ../shared/data/dsb2018 --name nuclei-light --width 12 \
        --diameter 20 --zoom 0.75 1.33 --crop 144 --steps 3000 \
        --distill-from segstudio/core/models/builtin/nuclei.json
    # on a GPU machine (CUDA torch): train there, then finish (tune, ONNX export, val metrics) on any machine
    python scripts/train_builtin.py --data DATA ... --device cuda --loader-threads 12 --train-only
    python scripts/train_builtin.py --data DATA ... --device auto   # finds the finished checkpoint
    # a card's metrics (DSB2018 val, the held-out synthetic hard set, the samples), re-measured after a change
    # to inference (e.g. the diameter estimate)
    python scripts/train_builtin.py --data ../shared/data/dsb2018 --remeasure nuclei
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segstudio.core.jobs import run_sync  # noqa: E402
from segstudio.core.models.catalog import BUILTIN_DIR, get_model, write_card  # noqa: E402
from segstudio.core.models.spec import ModelSpec, PostprocessParams, UNetConfig  # noqa: E402
from segstudio.core.segment.scale import object_diameters  # noqa: E402
from segstudio.core.tasks.evaluate import evaluate_job  # noqa: E402
from segstudio.core.training.datasets import find_pairs  # noqa: E402
from segstudio.core.training.train import (  # noqa: E402
    TrainConfig,
    config_dict,
    load_samples,
    predict_outputs,
    save_model,
    train_job,
    tune_postprocess,
)


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
    ap.add_argument("--asinh", type=float, default=0.0, metavar="C",
                    help="the network first compresses its input by asinh(x / C) / asinh(1 / C) (0: linear)")
    ap.add_argument("--crop", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--diameter", type=float, default=None,
                    help="resample every image so its nuclei are this many pixels across (default: native pixels)")
    ap.add_argument("--zoom", type=float, nargs=2, default=(0.7, 1.4))
    ap.add_argument("--augment", choices=("basic", "hard"), default="basic",
                    help="hard: also dim nuclei beside bright ones, texture, background ramps, defocus, "
                    "Poisson noise, few grey levels (segstudio.core.training.train.hard_photometric)")
    ap.add_argument("--hard-share", type=float, default=1.0,
                    help="with --augment hard: the share of crops that get it (the others: basic)")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="mix N synthetic hard-nuclei images (seeds 0..N-1) into training and 20 (seeds "
                    "100000..) into threshold tuning; the held-out set (tests/data/hard_nuclei) is seeds 900000..")
    ap.add_argument("--init-from", default=None, help="start from these weights (state dict or checkpoint)")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop after this epoch (the checkpoint stays; the schedule spans --epochs)")
    ap.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                    help="stop after the epoch that ends this long into the run (checkpoint kept; run again to go on)")
    ap.add_argument("--train-only", action="store_true",
                    help="stop after training, leaving the checkpoint in --workdir: the same command without this "
                    "option then tunes, exports and evaluates it (train on a GPU machine, finish elsewhere)")
    ap.add_argument("--distill-from", default=None,
                    help="train a light student by knowledge distillation from this model card")
    ap.add_argument("--steps", type=int, default=3000, help="distillation steps (with --distill-from)")
    ap.add_argument("--temperature", type=float, default=3.0, help="distillation temperature T")
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term")
    ap.add_argument("--speed", nargs=2, metavar=("MODEL", "AGAINST"), default=None,
                    help="only measure MODEL's CPU speed against AGAINST (interleaved) and write it into MODEL's card")
    ap.add_argument("--remeasure", default=None, metavar="MODEL",
                    help="only re-measure MODEL's metrics (DSB2018 val, the synthetic hard set, the samples) with the "
                    "current inference code and write them into its card")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (training only; inference stays on the CPU)")
    ap.add_argument("--loader-threads", type=int, default=0,
                    help="threads augmenting batches ahead of the network (on a GPU machine: most of its cores)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "nuclei")
    ap.add_argument("--out", type=Path, default=BUILTIN_DIR)
    args = ap.parse_args()
    if args.speed:
        record_speed(get_model(args.speed[0]).card_path, args.speed[1], args.data)
        return 0
    if args.remeasure:
        model = get_model(args.remeasure)
        spec = model.spec
        spec.metrics = {**(spec.metrics or {}), **val_metrics(model.card_path, args.data)}
        write_card(spec, model.files, model.card_path, model.provenance or None)
        return 0

    import torch

    cfg = TrainConfig(
        unet=UNetConfig(in_channels=1, out_channels=2, depth=args.depth, width=args.width, separable=args.separable,
                        input_asinh=args.asinh),
        epochs=args.epochs, crop=args.crop, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        diameter=args.diameter, zoom=tuple(args.zoom), init_from=args.init_from, stop_after=args.stop_after,
        threads=args.threads, device=args.device, loader_threads=args.loader_threads, time_limit_s=args.time_limit,
        augment=args.augment, hard_share=args.hard_share,
    )
    pairs = find_pairs(args.data / "train", args.data / "train", kind="fluorescence")
    tune_pairs = pairs[::10]
    train_pairs = [p for i, p in enumerate(pairs) if i % 10]
    print(f"train {len(train_pairs)} images, tune {len(tune_pairs)} images", flush=True)
    train = load_samples(train_pairs, cfg.normalization, cfg.unet.in_channels, cfg.diameter)
    tune = load_samples(tune_pairs, cfg.normalization, cfg.unet.in_channels)
    if args.synthetic:
        train += synthetic_samples(range(args.synthetic), cfg, cfg.diameter)
        tune += synthetic_samples(range(100000, 100020), cfg, None)
        print(f"+ {args.synthetic} synthetic hard-nuclei images in training, 20 in tuning", flush=True)

    teacher = None
    if args.distill_from:
        from segstudio.core.models.unet import build_unet
        from segstudio.core.optimize.distill import KDConfig, distill_job

        teacher_model = get_model(args.distill_from)
        teacher = build_unet(teacher_model.spec.config)
        teacher.load_state_dict(torch.load(teacher_model.file("torch"), weights_only=True))
        torch.manual_seed(args.seed)
        net = build_unet(cfg.unet)
        kd = KDConfig(steps=args.steps, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
                      temperature=args.temperature, alpha=args.alpha, zoom=tuple(args.zoom), seed=args.seed,
                      threads=args.threads, hard_share=args.hard_share if args.augment == "hard" else 0.0)
        t0 = time.perf_counter()
        result = run_sync(distill_job(net, teacher.eval(), [s.image for s in train], kd,
                                      labels=[(s.fg, s.dist) for s in train]), log)
        result["seconds"] = time.perf_counter() - t0
        history_loss = result["final_loss"]
    else:
        result = run_sync(train_job(train, cfg, args.workdir), log)
        if args.train_only or len(result["history"]) < cfg.epochs:
            print(f"stopped after epoch {len(result['history'])}; checkpoint in {args.workdir}", flush=True)
            return 0
        net = result["net"]
        history_loss = result["history"][-1]["loss"]
    net.eval()

    spec = ModelSpec(
        name=args.name, version=args.version,
        title="Nuclei in fluorescence images (U-Net, foreground + distance, watershed)"
        + (f", light: width {args.width}, distilled from {teacher_model.name}" if teacher is not None else ""),
        description="2-D nuclei in fluorescence microscopy (DAPI / Hoechst-like stains), one channel.",
        config=cfg.unet, input_channels=cfg.unet.in_channels, normalization=cfg.normalization,
        diameter=cfg.diameter,
        trained_on=f"DSB2018 stage 1 (BBBC038, CC0), fluorescence train split: {len(train_pairs)} images "
        f"({len(tune_pairs)} more held out to tune thresholds)"
        + (f"; {args.synthetic} synthetic hard-nuclei images (segstudio.core.training.synthetic, seeds 0-{args.synthetic - 1})"
           if args.synthetic else ""),
        license="CC0 training data; model weights released with segstudio",
    )

    # post-processing thresholds on held-out training images (at the model's scale, as inference runs)
    outputs = predict_outputs(net, tune, cfg.diameter)
    params, tune_ap = tune_postprocess(outputs, [s.labels for s in tune], PostprocessParams())
    spec.postprocess = params
    print(f"tuned post-processing: {params} (AP50 {tune_ap:.3f} on the tune images)", flush=True)

    diam = np.concatenate([object_diameters(s.labels) for s in tune[: len(tune_pairs)] + load_samples(train_pairs[:60], cfg.normalization, 1)])
    spec.median_diameter_px = round(float(np.median(diam)), 1)
    spec.pixel_scale = (
        f"DSB2018 nuclei are {np.percentile(diam, 5):.0f}-{np.percentile(diam, 95):.0f} px across (5th-95th "
        f"percentile), median {spec.median_diameter_px} px"
        + (f"; every image is resampled so its nuclei are {cfg.diameter:g} px across (estimated from the image, "
           f"or --diameter), trained with zoom {cfg.zoom[0]}-{cfg.zoom[1]}x around that"
           if cfg.diameter else f"; trained at native pixels with zoom {cfg.zoom[0]}-{cfg.zoom[1]}x")
    )
    defaults = {"epochs": 100, "width": 16, "depth": 3, "crop": 192, "diameter": None}
    command = "python scripts/train_builtin.py --data ../shared/data/dsb2018 --name " + args.name
    if args.version != "1.0":
        command += f" --version {args.version}"
    for key, default in defaults.items():
        if args.distill_from and key == "epochs":
            continue
        value = getattr(args, key)
        if value != default:
            command += f" --{key} {value:g}" if isinstance(value, float) else f" --{key} {value}"
    if tuple(args.zoom) != (0.7, 1.4):
        command += f" --zoom {args.zoom[0]} {args.zoom[1]}"
    if args.asinh:
        command += f" --asinh {args.asinh:g}"
    if args.augment != "basic":
        command += f" --augment {args.augment}"
        if args.hard_share < 1:
            command += f" --hard-share {args.hard_share:g}"
    if args.synthetic:
        command += f" --synthetic {args.synthetic}"
    if args.distill_from:
        command += f" --distill-from {args.distill_from} --steps {args.steps}"
    if args.init_from:
        command += f" --lr {args.lr:g} --init-from {args.init_from}"
    trained_on = result.get("device", "cpu")
    if trained_on != "cpu":
        command += " --device cuda" + (f" --loader-threads {args.loader_threads}" if args.loader_threads else "")
    spec.training = {
        "command": command,
        "config": config_dict(cfg),
        "seconds": round(result["seconds"]),
        "machine": trained_on if trained_on != "cpu"
        else f"{os.cpu_count()}-core {platform.machine()} CPU only, torch {torch.__version__}",
        "final_loss": history_loss,
        "tune_ap50": round(tune_ap, 4),
    }
    if teacher is not None:
        spec.training["distillation"] = {k: result[k] for k in ("steps", "temperature", "alpha", "feature_kd", "lr",
                                                                "crop", "batch_size", "labels")}
        spec.training["distillation"]["teacher"] = f"{teacher_model.name} v{teacher_model.spec.version}"
    example = np.stack([tune[0].image[:, :256, :256], tune[1].image[:, :256, :256]]).astype(np.float32)
    card = save_model(net, spec, args.out, example)
    print(f"ONNX vs PyTorch: {spec.training['onnx_vs_torch']}", flush=True)
    spec.metrics = val_metrics(card, args.data)
    model = get_model(card)
    write_card(spec, model.files, card)
    print(json.dumps(spec.metrics, indent=1))
    if teacher is not None:
        record_speed(card, args.distill_from, args.data)
    return 0


def synthetic_samples(seeds, cfg: TrainConfig, diameter: float | None) -> list:
    """Training samples of synthetic hard-nuclei images (:func:`segstudio.core.training.synthetic.hard_nuclei_image`)."""
    from segstudio.core.training.synthetic import hard_nuclei_image
    from segstudio.core.training.train import make_sample

    out = []
    for seed in seeds:
        image, labels, _ = hard_nuclei_image(np.random.default_rng(seed))
        out.append(make_sample(f"hard{seed}", image[None].astype(np.float32), labels, cfg.normalization,
                               cfg.unet.in_channels, diameter))
    return out


def record_speed(card, other, data: Path) -> dict:
    """Network latency of ``card``'s model against ``other``'s, interleaved on the same backend; into the card.

    One call on a batch of 4 tiles of 512 x 512 (the app's CPU batch), both
    models on OpenVINO FP32 (ONNX Runtime when OpenVINO is not installed),
    timed round-robin in one process so machine load hits both alike; plus
    the end-to-end time of segmenting the fluorescence val images.
    """
    from segstudio.core.backends import create_backend, installed
    from segstudio.core.optimize.validate import interleaved_latencies

    model, ref = get_model(card), get_model(other)
    name = "openvino" if installed("openvino") else "onnxruntime"
    batch = np.random.default_rng(0).random((4, 1, 512 + 2 * model.spec.halo, 512 + 2 * model.spec.halo),
                                            dtype=np.float32)
    with create_backend(name, model) as a, create_backend(name, ref) as b:
        ms_a, ms_b = interleaved_latencies([a, b], batch, repeats=15)
        describe = a.describe()
    val = find_pairs(data / "val", data / "val", kind="fluorescence")
    walls = {}
    for m in (model, ref, model, ref):  # twice each, alternating
        with create_backend(name, m) as be:
            t0 = time.perf_counter()
            run_sync(evaluate_job(val, m, be))
            walls.setdefault(m.name, []).append(time.perf_counter() - t0)
    speed = {
        "against": f"{ref.name} v{ref.spec.version}", "backend": describe,
        "network_ms_4x512": round(ms_a, 1), "against_network_ms_4x512": round(ms_b, 1),
        "network_speedup": round(ms_b / ms_a, 2),
        "val_seconds": round(min(walls[model.name]), 1), "against_val_seconds": round(min(walls[ref.name]), 1),
        "end_to_end_speedup": round(min(walls[ref.name]) / min(walls[model.name]), 2),
        "command": f"python scripts/train_builtin.py --data ../shared/data/dsb2018 --speed {model.name} {ref.name}",
        "machine": "2-core AMD EPYC (AVX2)", "date": time.strftime("%Y-%m-%d"),
    }
    spec = model.spec
    spec.metrics["cpu_speed"] = speed
    write_card(spec, model.files, model.card_path)
    print(json.dumps(speed, indent=1))
    return speed


EVAL_SETS = {
    # card key: (images folder, --kind, how the card names the folder in its command)
    "dsb2018_fluorescence_val": ("val", "fluorescence", "../shared/data/dsb2018/val"),
    "synthetic_hard_heldout": (ROOT / "tests" / "data" / "hard_nuclei", None, "tests/data/hard_nuclei"),
    "samples": (ROOT / "sample_data", None, "sample_data"),
}


def val_metrics(card: Path, data: Path) -> dict:
    """The model's scores on every set of :data:`EVAL_SETS`, as `segstudio eval` computes them.

    The DSB2018 fluorescence val split (under ``data``), the held-out
    synthetic hard-nuclei set (seeds 900000-900029) and the four samples;
    each with the command that reproduces it.
    """
    from segstudio.core.backends import create_backend

    model = get_model(card)
    out = {}
    for key, (folder, kind, shown) in EVAL_SETS.items():
        folder = data / folder if isinstance(folder, str) else folder
        pairs = find_pairs(folder, folder, kind=kind)
        t0 = time.perf_counter()
        with create_backend("onnxruntime", model) as backend:
            report = run_sync(evaluate_job(pairs, model, backend, by_size=True))
        mean = report["mean"]
        out[key] = {
            "images": len(pairs),
            "ap50": round(mean["ap50"], 4), "ap75": round(mean["ap75"], 4), "f1": round(mean["f1"], 4),
            "dice": round(mean["dice"], 4), "pq": round(mean["pq"], 4), "count_error": round(mean["count_error"], 4),
            "ap": {k: round(v, 4) for k, v in mean["ap"].items()},
            "by_size": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                        for r in report["by_size"]],
            "per_image_ap50": {r["name"]: round(r["ap50"], 4) for r in report["images"]} if len(pairs) <= 8 else None,
            "eval_seconds_onnxruntime": round(time.perf_counter() - t0, 1),
            "command": f"segstudio eval --model {model.name} --images {shown} --labels {shown}"
            + (f" --kind {kind}" if kind else "") + " --backend onnxruntime --by-size",
        }
        if out[key]["per_image_ap50"] is None:
            del out[key]["per_image_ap50"]
        print(key, json.dumps({k: out[key][k] for k in ("images", "ap50", "ap75", "f1", "pq")}), flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
