"""Instance segmentation metrics.

Objects of a prediction and of the ground truth are matched one-to-one: a
pair may match when their IoU is at least the threshold, and among such
pairings the largest number of matches is taken (ties broken by the larger
total IoU), as in the DSB2018 / StarDist / Cellpose convention.  Then, with
TP matched pairs, FP unmatched predictions and FN unmatched true objects:

* AP(t) = TP / (TP + FP + FN)  (the "average precision" of DSB2018)
* F1(t) = 2 TP / (2 TP + FP + FN)
* PQ    = (sum of matched IoUs) / (TP + FP / 2 + FN / 2)   at t = 0.5
* Dice  = 2 |A and B| / (|A| + |B|) of the binary foregrounds.

An image with no objects in either labels scores 1 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

from ..segment.options import SegmentOptions

DEFAULT_THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


@dataclass(frozen=True)
class Overlaps:
    """Sparse IoU between every true object and every predicted object."""

    gt_ids: np.ndarray  # (P,) ids of true objects in overlapping pairs
    pred_ids: np.ndarray  # (P,)
    iou: np.ndarray  # (P,)
    n_true: int
    n_pred: int


def overlaps(true: np.ndarray, pred: np.ndarray) -> Overlaps:
    """IoU of each overlapping (true, predicted) object pair."""
    if true.shape != pred.shape:
        raise ValueError(f"label shapes differ: {true.shape} vs {pred.shape}")
    t = true.ravel().astype(np.int64)
    p = pred.ravel().astype(np.int64)
    t_ids, t_inv = np.unique(t, return_inverse=True)
    p_ids, p_inv = np.unique(p, return_inverse=True)
    t_area = np.bincount(t_inv)
    p_area = np.bincount(p_inv)
    key = t_inv * len(p_ids) + p_inv
    pairs, inter = np.unique(key, return_counts=True)
    ti, pi = pairs // len(p_ids), pairs % len(p_ids)
    fg = (t_ids[ti] != 0) & (p_ids[pi] != 0)
    ti, pi, inter = ti[fg], pi[fg], inter[fg]
    iou = inter / (t_area[ti] + p_area[pi] - inter)
    return Overlaps(
        gt_ids=t_ids[ti], pred_ids=p_ids[pi], iou=iou,
        n_true=int((t_ids != 0).sum()), n_pred=int((p_ids != 0).sum()),
    )


def match(ov: Overlaps, threshold: float) -> np.ndarray:
    """IoUs of the one-to-one matches at ``threshold`` (maximum cardinality)."""
    return match_pairs(ov, threshold)[2]


def match_pairs(ov: Overlaps, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one-to-one matches at ``threshold``: ``(true ids, predicted ids, IoUs)``.

    Maximum cardinality; among pairings with as many matches, the larger total IoU.
    """
    ok = ov.iou >= threshold
    g, p, iou = ov.gt_ids[ok], ov.pred_ids[ok], ov.iou[ok]
    if len(iou) == 0:
        return g, p, iou
    g_u, g_i = np.unique(g, return_inverse=True)
    p_u, p_i = np.unique(p, return_inverse=True)
    ng = len(g_u)
    graph = sparse.coo_matrix((np.ones(len(iou)), (g_i, ng + p_i)), shape=(ng + len(p_u),) * 2)
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[g_i]
    picked = []
    # most components are a single pair; solve the rest exactly
    order = np.argsort(edge_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    for edges in np.split(order, bounds):
        if len(edges) == 1:
            picked.append(edges[0])
            continue
        rows, r_inv = np.unique(g_i[edges], return_inverse=True)
        cols, c_inv = np.unique(p_i[edges], return_inverse=True)
        score = np.zeros((len(rows), len(cols)))
        # one point per match dominates; IoU (< 1 in total per row) breaks ties
        score[r_inv, c_inv] = 1.0 + iou[edges] / (len(edges) + 1)
        rr, cc = linear_sum_assignment(score, maximize=True)
        real = score[rr, cc] > 0
        lookup = {(a, b): e for a, b, e in zip(r_inv, c_inv, edges)}
        picked.extend(lookup[(a, b)] for a, b in zip(rr[real], cc[real]))
    picked = np.asarray(picked, dtype=np.int64)
    return g[picked], p[picked], iou[picked]


def class_counts(true: np.ndarray, true_class: dict, pred: np.ndarray, pred_class: dict,
                 classes: tuple[str, ...], threshold: float = 0.5) -> dict[str, dict[str, int]]:
    """Per-class TP / FP / FN of cells: a true positive is matched (IoU >= ``threshold``) *and* of the same class.

    ``true_class`` / ``pred_class`` map object id -> class name.  A matched
    pair of different classes counts as a FN of the true class and a FP of
    the predicted one; unmatched objects are FN / FP of their own class.
    """
    g, p, _ = match_pairs(overlaps(true, pred), threshold)
    out = {c: {"tp": 0, "fp": 0, "fn": 0} for c in classes}
    for c in classes:
        n_true = sum(1 for v in true_class.values() if v == c)
        n_pred = sum(1 for v in pred_class.values() if v == c)
        tp = sum(1 for a, b in zip(g, p) if true_class[int(a)] == c and pred_class[int(b)] == c)
        out[c] = {"tp": tp, "fp": n_pred - tp, "fn": n_true - tp}
    return out


def f1_from_counts(c: dict[str, int]) -> float:
    return _ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"])


@dataclass(frozen=True)
class Scores:
    """Metrics of one image."""

    ap: dict[float, float]
    f1: dict[float, float]
    precision: dict[float, float]
    recall: dict[float, float]
    pq: float
    dice: float
    n_true: int
    n_pred: int

    def as_dict(self) -> dict:
        d = {
            "ap50": self.ap.get(0.5), "ap75": self.ap.get(0.75), "f1": self.f1.get(0.5),
            "dice": self.dice, "pq": self.pq, "n_true": self.n_true, "n_pred": self.n_pred,
            "precision": self.precision.get(0.5), "recall": self.recall.get(0.5),
        }
        d["ap"] = {f"{t:.2f}": v for t, v in self.ap.items()}
        return d


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 1.0


def score(true: np.ndarray, pred: np.ndarray, thresholds=DEFAULT_THRESHOLDS) -> Scores:
    """All metrics of a predicted label image against the true one."""
    ov = overlaps(true, pred)
    ap, f1, prec, rec = {}, {}, {}, {}
    pq = 1.0
    for t in sorted(set(thresholds) | {0.5}):
        m = match(ov, t)
        tp = len(m)
        fp, fn = ov.n_pred - tp, ov.n_true - tp
        ap[t] = _ratio(tp, tp + fp + fn)
        f1[t] = _ratio(2 * tp, 2 * tp + fp + fn)
        prec[t] = _ratio(tp, tp + fp)
        rec[t] = _ratio(tp, tp + fn)
        if t == 0.5:
            pq = _ratio(float(m.sum()), tp + fp / 2 + fn / 2)
    a, b = true > 0, pred > 0
    dice = _ratio(2 * np.logical_and(a, b).sum(), a.sum() + b.sum())
    keep = set(thresholds)
    pick = lambda d: {t: v for t, v in d.items() if t in keep or t == 0.5}  # noqa: E731
    return Scores(pick(ap), pick(f1), pick(prec), pick(rec), pq, dice, ov.n_true, ov.n_pred)


def mean_scores(rows: list[dict]) -> dict:
    """Mean of the per-image metrics (keys ap50, ap75, f1, dice, pq)."""
    keys = ("ap50", "ap75", "f1", "dice", "pq")
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    out["count_error"] = float(np.mean([abs(r["n_pred"] - r["n_true"]) / max(r["n_true"], 1) for r in rows]))
    thresholds = rows[0].get("ap", {}).keys() if rows else []
    out["ap"] = {t: float(np.mean([r["ap"][t] for r in rows])) for t in thresholds}
    return out


SIZE_BINS = (0.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 100.0, float("inf"))


def size_counts(true: np.ndarray, pred: np.ndarray, edges=SIZE_BINS, threshold: float = 0.5) -> np.ndarray:
    """TP / FP / FN per nucleus-diameter bin: an ``(len(edges) - 1, 3)`` int array.

    A true object falls in the bin of its equivalent-circle diameter
    ``2 sqrt(area / pi)``; a matched pair (IoU >= ``threshold``) counts as a
    TP of its true object's bin, an unmatched prediction as a FP of the bin
    of its own diameter.  So a bin's AP50, TP / (TP + FP + FN), says how the
    model does on nuclei of that size.
    """
    def bins_of(labels):
        areas = np.bincount(np.asarray(labels).ravel().astype(np.int64))
        d = 2.0 * np.sqrt(areas / np.pi)
        return np.clip(np.searchsorted(edges, d, side="right") - 1, 0, len(edges) - 2)

    g, p, _ = match_pairs(overlaps(true, pred), threshold)
    out = np.zeros((len(edges) - 1, 3), np.int64)
    t_bin, p_bin = bins_of(true), bins_of(pred)
    t_ids, p_ids = np.unique(true), np.unique(pred)
    t_ids, p_ids = t_ids[t_ids != 0], p_ids[p_ids != 0]
    tp = np.bincount(t_bin[g.astype(np.int64)], minlength=len(out))
    n_true = np.bincount(t_bin[t_ids.astype(np.int64)], minlength=len(out))
    unmatched = np.setdiff1d(p_ids, p)
    out[:, 0] = tp
    out[:, 1] = np.bincount(p_bin[unmatched.astype(np.int64)], minlength=len(out))
    out[:, 2] = n_true - tp
    return out


def size_table(counts: np.ndarray, edges=SIZE_BINS) -> list[dict]:
    """Rows ``{"diameter_px", "n_true", "tp", "fp", "fn", "ap50", "recall"}`` of the bins that hold objects."""
    rows = []
    for (tp, fp, fn), lo, hi in zip(counts.tolist(), edges[:-1], edges[1:]):
        if tp + fp + fn == 0:
            continue
        rows.append({"diameter_px": f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">{lo:g}", "n_true": tp + fn,
                     "tp": tp, "fp": fp, "fn": fn, "ap50": _ratio(tp, tp + fp + fn), "recall": _ratio(tp, tp + fn)})
    return rows


def evaluate_job(pairs, model, backend, options: SegmentOptions | None = None, *, keep_worst: int = 0,
                 by_size: bool = False, cancel=None):
    """Segment each image of ``pairs`` and score it against its labels.

    A job yielding one ``Progress("eval", i, n)`` per image; returns
    ``{"mean": {...}, "images": [{"name", "ap50", ...}, ...]}`` and, with
    ``keep_worst``, ``"worst"``: the ``keep_worst`` lowest-AP50 images as
    ``(ap50, name, image path, truth, prediction)`` (for :func:`worst_images_png`).
    With ``by_size``, ``"by_size"``: the objects of all images pooled by
    diameter (:func:`size_counts`, :func:`size_table`).
    ``options``: how each image is segmented (:class:`SegmentOptions`; no
    measurements are made).
    """
    import heapq

    from ..image.sources import open_source, read_image
    from ..jobs import Progress
    from ..segment.job import segment_job
    from ..training.datasets import mismatch_error

    options = (options or SegmentOptions()).but(measure_cells=False)
    rows, worst = [], []
    sizes = np.zeros((len(SIZE_BINS) - 1, 3), np.int64)
    yield Progress("eval", 0, len(pairs))
    for i, pair in enumerate(pairs):
        if cancel is not None:
            cancel.raise_if_cancelled()
        truth = read_image(pair.labels).data
        # the image is read as the segmentation needs it (region by region when large), never held twice
        with open_source(pair.image) as source:
            if truth.shape[-2:] != source.plane_shape:  # before the work
                raise mismatch_error(pair, truth.shape, source.plane_shape)
            result = yield from segment_job(source, model, backend, options, cancel=cancel)
        if result.labels.size != truth.size:  # as many planes
            raise mismatch_error(pair, truth.shape, result.labels.shape)
        pred = result.labels.reshape(truth.shape)
        row = {"name": pair.name, **score(truth, pred).as_dict()}
        if by_size:
            sizes += size_counts(truth, pred)
        if result.diameter is not None:
            row["diameter_px"] = round(result.diameter, 2)
            row["scale"] = round(result.scale, 3)
        rows.append(row)
        if keep_worst:
            # max-heap on AP50 (negated) holding the keep_worst lowest
            item = (-row["ap50"], i, pair.name, pair.image, truth, pred)
            if len(worst) < keep_worst:
                heapq.heappush(worst, item)
            elif -item[0] < -worst[0][0]:
                heapq.heapreplace(worst, item)
        yield Progress("eval", i + 1, len(pairs), f"{pair.name}: AP50 {row['ap50']:.3f}")
    report = {"mean": mean_scores(rows), "images": rows}
    if by_size:
        report["by_size"] = size_table(sizes)
    if keep_worst:
        report["worst"] = [(-w[0], w[2], w[3], w[4], w[5]) for w in sorted(worst, key=lambda w: (-w[0], w[1]))]
    return report


def worst_images_png(path, worst, *, columns: int = 4, size: int = 320) -> None:
    """A PNG grid of images with the true outlines (green) and the predicted ones (magenta).

    ``worst`` as returned by :func:`evaluate_job` with ``keep_worst``; each
    panel is titled with the image name, its AP50 and the object counts.
    """
    from PIL import Image, ImageDraw

    from ..image.io import atomic_path
    from ..image.sources import read_image
    from ..models.spec import Normalization
    from ..segment.preprocess import normalize, select_channels

    if not worst:
        return
    rows = -(-len(worst) // columns)
    title_h = 18
    sheet = Image.new("RGB", (columns * size, rows * (size + title_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (ap50, name, image_path, truth, pred) in enumerate(worst):
        plane = next(read_image(image_path).planes())[1]
        x = normalize(select_channels(plane, 1, "mean" if plane.shape[0] > 1 else None), Normalization())[0]
        grey = (np.clip(x, 0, 1) * 255).astype(np.uint8)
        rgb = np.stack([grey] * 3, axis=-1)
        rgb[_outline(truth)] = (0, 230, 0)
        rgb[_outline(pred)] = (255, 0, 255)
        panel = Image.fromarray(rgb)
        panel.thumbnail((size, size), Image.Resampling.NEAREST)
        r, c = divmod(k, columns)
        x0, y0 = c * size, r * (size + title_h)
        sheet.paste(panel, (x0, y0 + title_h))
        n_true, n_pred = len(np.unique(truth)) - 1, len(np.unique(pred)) - 1
        draw.text((x0 + 3, y0 + 3), f"{name}  AP50 {ap50:.3f}  true {n_true} / pred {n_pred}", fill="black")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def _outline(labels: np.ndarray) -> np.ndarray:
    """Pixels of an object that touch another id (or background) to the right or below."""
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, bool)
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[:, 1:] |= lab[:, :-1] != lab[:, 1:]
    edge[1:, :] |= lab[:-1, :] != lab[1:, :]
    return edge & (lab > 0)
