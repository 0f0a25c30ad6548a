"""Validating a step: what it cost in accuracy and bought in speed, on the user's images.

With labels, accuracy is AP50 / Dice / count error against them; without,
it is agreement with the parent (AP50 of the child's instances against the
parent's) plus the output cosine and max abs error.  Speed is the measured
latency of a batch of real tiles on the backend the artifact would run on
(the fastest installed one for its precision), never a MAC count, and is
compared with PyTorch eager FP32 of the original model measured in the same
run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backends import create_backend, installed
from ..errors import SegStudioError
from ..image.io import ImageData
from ..image.sources import read_image
from ..jobs import CancelToken, Job, Progress
from ..models.catalog import Model
from ..models.onnx_export import compare_outputs
from ..segment.job import segment_job
from ..segment.options import SegmentOptions
from ..segment.preprocess import normalize, select_channels
from ..segment.tiling import plan_tiles, read_region
from ..tasks.evaluate import mean_scores, score
from ..training.datasets import find_images, find_pairs, read_pair


@dataclass
class ValidationSet:
    images: list[ImageData]
    labels: list[np.ndarray] | None = None
    names: list[str] = field(default_factory=list)

    @classmethod
    def from_folders(cls, images: str | Path, labels: str | Path | None = None, *, kind: str | None = None,
                     limit: int | None = None) -> "ValidationSet":
        images = Path(images)
        if labels is not None:
            pairs = find_pairs(images, labels, kind=kind)[:limit]
            read = [read_pair(p) for p in pairs]
            return cls([image for image, _ in read], [labels for _, labels in read], [p.name for p in pairs])
        files = find_images(images, kind=kind)[:limit]
        return cls([read_image(p) for p in files], None, [p.stem for p in files])

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def speed_batch(self, model: Model, *, batch: int = 4, tile: int = 512) -> np.ndarray:
        """``batch`` real tiles of the default tile shape (halo included), for latency."""
        spec = model.spec
        plan = plan_tiles((tile, tile), tile=tile, halo=spec.halo, multiple=spec.multiple)
        tiles = []
        i = 0
        while len(tiles) < batch:
            img = self.images[i % len(self.images)]
            plane = next(img.planes())[1]
            x = normalize(select_channels(plane, spec.input_channels, None), spec.normalization)
            h, w = x.shape[1:]
            y0 = (i * 97) % max(h - tile, 1) if h > tile else 0
            x0 = (i * 131) % max(w - tile, 1) if w > tile else 0
            region = ((y0 - spec.halo, y0 - spec.halo + plan.tile_shape[0]),
                      (x0 - spec.halo, x0 - spec.halo + plan.tile_shape[1]))
            tiles.append(read_region(x, region))
            i += 1
        return np.stack(tiles).astype(np.float32)


def target_variants(model: Model, target: str = "cpu") -> list[str]:
    """Variants that run this artifact on ``target``, for its precision (int8 > fp16 > fp32 files)."""
    files = model.files
    if target == "gpu":
        cands = []
        if "onnx_int8" in files:
            cands += ["tensorrt:int8", "ort@tensorrt:int8"]
        if "onnx_fp16" in files:
            cands += ["ort@cuda:fp16"]
        if "torch" in files:
            cands += ["torch@cuda:fp16+cl+graph"]
        cands += ["tensorrt:fp16", "torch@cuda:fp32+cl+graph"]
    else:
        if "onnx_int8" in files:
            cands = ["openvino:int8", "ort:int8"]
        elif "onnx" in files:
            cands = ["openvino", "ort"]
        else:
            cands = ["torch@cpu"]
    from ..backends import backend_class, parse_variant

    out = []
    for c in cands:
        v = parse_variant(c)
        cls = backend_class(v.name)
        if installed(cls.package) and cls.model_file(v.device, v.precision) in files:
            out.append(c)
    return out


def _check(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.raise_if_cancelled()


def latency_ms(backend, batch: np.ndarray, *, repeats: int = 7, warmup: int = 2,
               cancel: CancelToken | None = None) -> float:
    """Median milliseconds of one ``predict`` of ``batch`` (after warm-up).

    ``cancel`` is checked before every call (a call of a big batch on a busy CPU takes a second).
    """
    for _ in range(warmup):
        _check(cancel)
        backend.predict(batch)
    times = []
    for _ in range(repeats):
        _check(cancel)
        t0 = time.perf_counter()
        backend.predict(batch)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def interleaved_latencies(runners: list, batch: np.ndarray, *, repeats: int = 9, warmup: int = 2,
                          cancel: CancelToken | None = None) -> list[float]:
    """Median ms of one ``predict(batch)`` for each runner, timed round-robin (one call each per round).

    ``cancel`` is checked before every call.
    """
    for r in runners:
        for _ in range(warmup):
            _check(cancel)
            r.predict(batch)
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for i, r in enumerate(runners):
            _check(cancel)
            t0 = time.perf_counter()
            r.predict(batch)
            times[i].append(time.perf_counter() - t0)
    return [1e3 * float(np.median(t)) for t in times]


def variant_latencies(model: Model, batch: np.ndarray, target: str = "cpu",
                      cancel: CancelToken | None = None) -> dict[str, float]:
    """Latency in ms of every installed variant that runs the artifact (fastest first)."""
    timed = {}
    errors = []
    for v in target_variants(model, target):
        _check(cancel)
        try:
            with create_backend(v, model) as b:
                timed[v] = latency_ms(b, batch, cancel=cancel)
        except SegStudioError as e:
            errors.append(f"{v}: {e}")
    if not timed:
        raise SegStudioError(f"no backend can run {model.name} on the {target}: "
                             + "; ".join(errors or ["none installed"]))
    return dict(sorted(timed.items(), key=lambda kv: kv[1]))


def segment_all(model: Model, backend, vset: ValidationSet, cancel: CancelToken | None = None,
                diameters: list[float | None] | None = None) -> Job[tuple[list, list]]:
    """Instance labels of every validation image and the nuclei diameter each was segmented at (a job).

    ``diameters``: segment image ``i`` at ``diameters[i]`` pixels instead of
    the model's own estimate (``None`` entries: estimated).
    """
    from ..segment.options import Diameter

    labels, used = [], []
    for i, img in enumerate(vset.images):
        d = diameters[i] if diameters is not None else None
        opts = SegmentOptions(measure_cells=False, diameter=Diameter("px", float(d)) if d else Diameter())
        res = yield from segment_job(img, model, backend, opts, cancel=cancel)
        labels.append(res.labels.reshape(res.labels.shape[-2:]) if res.labels.ndim > 2 else res.labels)
        used.append(res.diameter)
        yield Progress("validate", i + 1, len(vset.images))
    return labels, used


def agreement(pred: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Mean AP50 of ``pred`` against ``reference`` instances (1 = the same objects)."""
    return float(np.mean([score(r, p, thresholds=(0.5,)).ap[0.5] for r, p in zip(reference, pred)]))


def accuracy(pred: list[np.ndarray], vset: ValidationSet, parent_pred: list[np.ndarray] | None) -> dict:
    out = {}
    if vset.has_labels:
        rows = [score(t, p).as_dict() for t, p in zip(vset.labels, pred)]
        m = mean_scores(rows)
        out.update(ap50=m["ap50"], ap75=m["ap75"], dice=m["dice"], f1=m["f1"], count_error=m["count_error"])
    if parent_pred is not None:
        out["agreement_ap50"] = agreement(pred, parent_pred)
    return out


def measure_artifact(model: Model, vset: ValidationSet, batch: np.ndarray, *, target: str = "cpu",
                     parent: dict | None = None, cancel: CancelToken | None = None,
                     diameters: list[float | None] | None = None) -> Job[dict]:
    """Accuracy, agreement with the parent, output difference, speed, size, parameters and FLOPs.

    ``parent`` is this function's result for the parent (its ``_pred`` and
    ``_out`` are used for agreement and output difference); ``diameters``:
    segment at these nuclei diameters (:func:`segment_all`) instead of the
    model's own estimates, which are in ``_diameters`` otherwise.
    """
    latencies = variant_latencies(model, batch, target, cancel=cancel)
    variant, ms = next(iter(latencies.items()))
    yield Progress("validate", 0, len(vset.images), f"validating on {variant}")
    with create_backend(variant, model) as backend:
        pred, used = yield from segment_all(model, backend, vset, cancel, diameters)
        out = backend.predict(batch[:1])
    cfg = model.spec.config
    tile = batch.shape[-1]
    from ..backends import backend_class, parse_variant

    v = parse_variant(variant)
    weights = model.files[backend_class(v.name).model_file(v.device, v.precision)]
    result = {
        "variant": variant,
        "latency_ms": ms,
        "latency_by_backend_ms": latencies,
        "batch": list(batch.shape),
        "size_mb": weights.stat().st_size / 2**20,
        "params": cfg.parameters(),
        "gflops_per_tile": cfg.flops(tile, tile) / 1e9,
        **accuracy(pred, vset, parent.get("_pred") if parent else None),
        "_pred": pred,
        "_out": out,
        "_diameters": used,
    }
    if parent is not None and parent.get("_out") is not None:
        result["output_vs_parent"] = compare_outputs(parent["_out"], out)
    return result


def eager_baseline_ms(model: Model, batch: np.ndarray, cancel: CancelToken | None = None) -> float:
    """PyTorch eager FP32 latency of the original model on ``batch`` (the speed reference)."""
    from ..backends.eager import EagerTorch

    net = EagerTorch(model, "cpu")
    try:  # a first figure; the report's comes from the end
        return latency_ms(net, batch, repeats=3, warmup=1, cancel=cancel)
    finally:
        net.close()


def public(result: dict) -> dict:
    """A measurement without its private arrays (for JSON)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
