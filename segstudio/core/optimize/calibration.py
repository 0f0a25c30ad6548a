"""Calibration images: the user's own images, as the model will see them.

A :class:`CalibrationSource` holds images (from a folder, or arrays such as
napari layers), normalized exactly as segmentation normalizes them (per
channel, percentiles of the whole image).  It serves

* :meth:`tiles`: ``n_tiles`` representative tiles for INT8 calibration,
  chosen across the files *and* across their intensity range: every
  candidate tile on a grid is ranked by mean intensity, the ranking is cut
  into ``n_tiles`` equal strata and one tile is drawn from each (so dim
  background and bright crowded regions are both represented), and
* :meth:`images`: the whole normalized images, for distillation crops.

:attr:`digest` hashes the images' contents and the sampling parameters, so a
report can say exactly which set calibrated a model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..image.io import ImageData
from ..image.sources import read_image
from ..models.spec import ModelSpec
from ..segment.preprocess import normalize, select_channels

DEFAULT_TILES = 64


@dataclass
class _Entry:
    name: str
    plane: np.ndarray  # normalized model input (C, H, W) float32
    digest: str


class CalibrationSource:
    def __init__(self, images: list[ImageData], spec: ModelSpec, *, n_tiles: int = DEFAULT_TILES,
                 tile: int = 256, seed: int = 0, channel: int | str | None = None, max_images: int | None = None,
                 labels: list[np.ndarray] | None = None):
        if not images:
            raise InputError("no calibration images", hint="give a folder of your own images")
        if n_tiles < 1:
            raise InputError("the calibration set needs at least one tile")
        self.spec = spec
        self.n_tiles, self.tile, self.seed = n_tiles, tile, seed
        rng = np.random.default_rng(seed)
        if max_images is not None and len(images) > max_images:
            chosen = sorted(rng.choice(len(images), max_images, replace=False))
            images = [images[i] for i in chosen]
            labels = [labels[i] for i in chosen] if labels is not None else None
        self.labels: list[tuple[np.ndarray, np.ndarray]] | None = None  # (foreground, distance) targets
        self.instances: list[np.ndarray] | None = None  # the instance labels themselves
        if labels is not None:
            from ..training.train import distance_target

            self.instances = [np.asarray(lb).reshape(lb.shape[-2:]).astype(np.int32) for lb in labels]
            self.labels = [((lb > 0).astype(np.float32), distance_target(lb)) for lb in self.instances]
        self.entries: list[_Entry] = []
        for img in images:
            for index, plane in img.planes():
                x = normalize(select_channels(plane, spec.input_channels, channel), spec.normalization)
                digest = hashlib.sha256(np.ascontiguousarray(plane).tobytes()).hexdigest()[:16]
                name = img.name + (f"[{','.join(map(str, index))}]" if index else "")
                self.entries.append(_Entry(name, x, digest))
        self._tiles: list[np.ndarray] | None = None
        self._positions: list[tuple[int, int, int]] = []

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_folder(cls, folder: str | Path, spec: ModelSpec, *, kind: str | None = None, with_labels: bool = False,
                    **kwargs) -> "CalibrationSource":
        """Every image in ``folder`` (label files ``*_labels.*`` are skipped); ``kind`` filters by index.json.

        With ``with_labels`` the images are those with a label file beside
        them (``X_img`` / ``X_labels``), and the labels are kept for
        fine-tuning.
        """
        from ..training.datasets import find_images, find_pairs, read_pair

        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"{folder} is not a folder of calibration images")
        if with_labels:
            read = [read_pair(p) for p in find_pairs(folder, folder, kind=kind)]
            return cls([image for image, _ in read], spec, labels=[labels for _, labels in read], **kwargs)
        files = find_images(folder, kind=kind)
        return cls([read_image(p) for p in files], spec, **kwargs)

    @classmethod
    def from_arrays(cls, arrays: list[tuple[np.ndarray, str | None, str]], spec: ModelSpec, **kwargs) -> "CalibrationSource":
        """From in-memory images (napari layers): ``(data, axes or None, name)`` each."""
        from ..image.io import as_image

        return cls([as_image(a, axes, name=name) for a, axes, name in arrays], spec, **kwargs)

    # ------------------------------------------------------------------ use
    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for e in self.entries:
            h.update(e.digest.encode())
        h.update(f"{self.n_tiles}:{self.tile}:{self.seed}".encode())
        return h.hexdigest()[:16]

    def images(self) -> list[np.ndarray]:
        return [e.plane for e in self.entries]

    def tiles(self) -> list[np.ndarray]:
        """``n_tiles`` tiles ``(1, C, t, t)`` stratified by intensity across all images (cached)."""
        if self._tiles is None:
            t = self.tile
            cands = []  # (mean intensity, entry, y, x)
            for i, e in enumerate(self.entries):
                h, w = e.plane.shape[1:]
                th, tw = min(t, h), min(t, w)
                for y in range(0, max(h - th, 0) + 1, max(th // 2, 1)):
                    for x in range(0, max(w - tw, 0) + 1, max(tw // 2, 1)):
                        cands.append((float(e.plane[:, y : y + th, x : x + tw].mean()), i, y, x))
            cands.sort(key=lambda c: c[0])
            rng = np.random.default_rng(self.seed)
            strata = np.array_split(np.arange(len(cands)), min(self.n_tiles, len(cands)))
            picks = [cands[int(rng.choice(s))] for s in strata if len(s)]
            mult = self.spec.multiple
            tiles = []
            for _, i, y, x in picks:
                plane = self.entries[i].plane
                tile = plane[:, y : y + t, x : x + t]
                # pad small images up to the tile (a multiple of the network stride)
                ph, pw = max(0, t - tile.shape[1]), max(0, t - tile.shape[2])
                if ph or pw:
                    tile = np.pad(tile, ((0, 0), (0, ph), (0, pw)), mode="reflect")
                tile = tile[:, : t - t % mult, : t - t % mult]
                tiles.append(np.ascontiguousarray(tile[np.newaxis], dtype=np.float32))
                self._positions.append((i, y, x))
            self._tiles = tiles
        return self._tiles

    def describe(self) -> dict:
        self.tiles()
        return {
            "images": len(self.entries), "tiles": len(self._tiles or []), "tile": self.tile,
            "digest": self.digest, "files": [e.name for e in self.entries][:50],
            "intensity_range": [float(min(t.mean() for t in self._tiles)), float(max(t.mean() for t in self._tiles))],
        }

    def chosen_tiles(self) -> list[tuple[str, int, int, np.ndarray]]:
        """The tiles :meth:`tiles` chose, with where they come from: ``(entry name, y, x, tile (1, C, t, t))``."""
        tiles = self.tiles()
        return [(self.entries[i].name, y, x, tile) for (i, y, x), tile in zip(self._positions, tiles)]


# thresholds of calibration_warnings
MIN_TILES, MIN_IMAGES = 16, 3
SATURATED_FRACTION = 0.01  # of an image's pixels at its maximum value
EMPTY_SPAN = 0.05  # a tile whose values span less than this (1 = the image's low..high percentile) is empty
EMPTY_FRACTION = 0.25  # of the chosen tiles


def _file_of(entry_name: str) -> str:
    """The file (or layer) an entry comes from: ``"cells[3]"`` (plane 3 of a stack) -> ``"cells"``."""
    return entry_name.split("[", 1)[0] if entry_name.endswith("]") else entry_name


def calibration_warnings(source: CalibrationSource) -> list[str]:
    """Plain-language warnings about a calibration set (empty when it looks fit for INT8 calibration).

    * too small: fewer than ``MIN_TILES`` tiles or ``MIN_IMAGES`` images;
    * one file only: every image (plane) comes from one file or layer;
    * saturated: more than ``SATURATED_FRACTION`` of an image's pixels are at its maximum;
    * empty: an image is constant, or more than ``EMPTY_FRACTION`` of the chosen tiles
      span less than ``EMPTY_SPAN`` of their image's normalized range.
    """
    chosen = source.chosen_tiles()
    n_tiles, n_images = len(chosen), len(source.entries)
    out = []
    if n_tiles < MIN_TILES or n_images < MIN_IMAGES:
        out.append(f"Small set: {n_tiles} tile{'s' * (n_tiles != 1)} from {n_images} image"
                   f"{'s' * (n_images != 1)}. INT8 ranges measured on so little may miss what your other images "
                   f"hold; give at least {MIN_IMAGES} images and {MIN_TILES} tiles.")
    files = sorted({_file_of(e.name) for e in source.entries})
    if len(files) == 1:
        out.append(f"Every tile comes from one file ({files[0]}): if your other images differ (stain, exposure, "
                   "density), add some of them.")
    for e in source.entries:
        plane = e.plane
        span = float(np.ptp(plane)) if plane.size else 0.0
        if span < 1e-6:
            out.append(f"{e.name} is constant (an empty image): it teaches the quantizer nothing.")
            continue
        at_max = max(float(np.mean(ch == ch.max())) for ch in plane)
        if at_max > SATURATED_FRACTION:
            out.append(f"{e.name} is saturated: {at_max:.1%} of its pixels are at the maximum value, so the "
                       "brightest nuclei have lost their detail and calibration learns a clipped range.")
    empty = sum(1 for _, _, _, tile in chosen if float(np.ptp(tile)) < EMPTY_SPAN)
    if n_tiles and empty / n_tiles > EMPTY_FRACTION:
        out.append(f"{empty} of the {n_tiles} chosen tiles are nearly empty (almost constant): calibration needs "
                   "tiles with nuclei in them.")
    return out
