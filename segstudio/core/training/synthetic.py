"""Synthetic two-channel live/dead (viability) images with known answers.

No annotated viability set is at hand, so the viability model is trained and
measured on images made here.  What is modelled, and why:

* **Assays** (``assay``): ``"live-dead"``: channel 0 a live stain that fills
  the cytoplasm of live cells (calcein-AM), channel 1 a dead stain in the
  nuclei of dead cells (propidium iodide, ethidium homodimer);
  ``"nuclear-dead"``: channel 0 a nuclear stain in every cell (Hoechst),
  channel 1 the dead stain.
* **Shapes**: live cells are ellipses (axis ratio 0.55-1) with a wavy border
  (radial Fourier perturbation); dead cells are smaller and rounder (axis
  ratio 0.8-1, little perturbation): they shrink and round up when the
  membrane fails (and condensed nuclei are small and round).
* **Crowding**: a share of cells sits in clusters (Gaussian around a few
  centres), the rest uniformly; cells may touch and overlap by up to 20 % of
  their area; later cells are painted under earlier ones, so labels never
  overlap.
* **Ratio**: the live:dead ratio is drawn log-uniformly between 1:20 and
  20:1 per image (or fixed with ``live_fraction``).
* **Intensities**: a cell's signal follows its height (a dome: brightest
  at the centre, about half at the border, so touching cells meet at a
  dimmer seam); live cells vary in brightness (x2 between cells) and
  carry a smooth texture; dead cells are bright in the dead channel, near
  black in the live stain (a few percent of residual esterase activity) and,
  in the nuclear assay, brighter than live nuclei (condensed chromatin).
* **Optics and camera**: bleed-through between channels (0-10 % each way),
  Gaussian PSF (sigma 0.8-2 px), uneven illumination (a smooth
  multiplicative field, up to +-35 %), background offset, Poisson shot noise
  at 20-600 photons for the brightest cell, Gaussian read noise, 12-bit
  camera counts in a uint16 image.

Everything is drawn from a ``numpy`` generator seeded by the caller, so a
seed gives the same image, labels and classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

LIVE, DEAD = 1, 2
CLASS_NAMES = ("live", "dead")
ASSAYS = ("live-dead", "nuclear-dead")


@dataclass(frozen=True)
class ViabilityParams:
    """Parameters of :func:`viability_image` (ranges are drawn uniformly unless said otherwise)."""

    shape: tuple[int, int] = (256, 256)
    cells: tuple[int, int] = (15, 90)  # number of cells placed (before overlap rejection)
    live_radius: tuple[float, float] = (7.0, 13.0)  # semi-major axis, px (live-dead assay: whole cell)
    nucleus_radius: tuple[float, float] = (5.0, 9.0)  # semi-major axis of live nuclei (nuclear-dead assay)
    dead_shrink: tuple[float, float] = (0.5, 0.8)  # dead cell radius / live radius
    ratio: tuple[float, float] = (1 / 20, 20.0)  # live:dead, log-uniform
    clustered: tuple[float, float] = (0.0, 0.8)  # share of cells placed in clusters
    max_overlap: float = 0.2
    bleed: tuple[float, float] = (0.0, 0.1)
    psf_sigma: tuple[float, float] = (0.8, 2.0)
    illumination: tuple[float, float] = (0.0, 0.35)
    photons: tuple[float, float] = (20.0, 600.0)  # log-uniform, at intensity 1
    read_noise: tuple[float, float] = (0.002, 0.02)
    background: tuple[float, float] = (0.01, 0.06)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _cell_mask(rng: np.random.Generator, a: float, ratio: float, wobble: float) -> np.ndarray:
    """Boolean mask of one cell: an ellipse with semi-axes ``a``, ``a * ratio`` and a wavy border."""
    theta0 = rng.uniform(0, math.pi)
    harmonics = [(k, rng.normal(0, wobble / k), rng.uniform(0, 2 * math.pi)) for k in range(2, 6)]
    r = int(math.ceil(a * (1 + 2 * wobble))) + 1
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    c, s = math.cos(theta0), math.sin(theta0)
    u, v = xx * c + yy * s, -xx * s + yy * c
    phi = np.arctan2(v, u)
    rho = np.hypot(u / a, v / (a * ratio))
    edge = 1.0 + sum(amp * np.cos(k * phi + ph) for k, amp, ph in harmonics)
    return rho <= edge


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Smooth random field, zero mean, unit standard deviation, features ~``scale`` px."""
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), scale, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-8)


def viability_image(
    rng: np.random.Generator, params: ViabilityParams = ViabilityParams(), *, assay: str | None = None,
    live_fraction: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """One synthetic image.

    Returns ``(image, labels, classes, info)``: ``image`` (2, H, W) uint16;
    ``labels`` (H, W) int32 with ids 1..N; ``classes`` (N + 1,) uint8 with
    ``classes[id]`` = :data:`LIVE` or :data:`DEAD` (``classes[0]`` = 0);
    ``info`` the drawn parameters.
    """
    h, w = params.shape
    assay = assay or ASSAYS[int(rng.integers(len(ASSAYS)))]
    if assay not in ASSAYS:
        raise ValueError(f"assay must be one of {ASSAYS}")
    if live_fraction is None:
        ratio = _log_uniform(rng, *params.ratio)
        live_fraction = ratio / (1 + ratio)
    n_target = int(rng.integers(params.cells[0], params.cells[1] + 1))
    clustered = rng.uniform(*params.clustered)
    centres = rng.uniform([0, 0], [h, w], size=(int(rng.integers(1, 5)), 2))
    spread = rng.uniform(12, 40)
    size_range = params.nucleus_radius if assay == "nuclear-dead" else params.live_radius

    labels = np.zeros((h, w), np.int32)
    classes = [0]
    channels = np.zeros((2, h, w), np.float32)  # the live stain's and the dead stain's signal
    texture = 1.0 + 0.25 * _smooth_field(rng, (h, w), 2.0)
    for _ in range(n_target):
        dead = rng.random() >= live_fraction
        a = rng.uniform(*size_range)
        if dead:
            mask = _cell_mask(rng, a * rng.uniform(*params.dead_shrink), rng.uniform(0.8, 1.0), 0.03)
        else:
            mask = _cell_mask(rng, a, rng.uniform(0.55, 1.0), 0.08)
        if rng.random() < clustered:
            cy, cx = centres[int(rng.integers(len(centres)))] + rng.normal(0, spread, 2)
        else:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        if _paint_cell(rng, params, assay, (labels, channels), mask, (cy, cx), dead, len(classes)):
            classes.append(DEAD if dead else LIVE)

    # live cells carry texture (cytoplasm, chromatin); dead cells are uniform
    is_live = np.asarray(classes, np.uint8)[labels] == LIVE
    live_ch, dead_ch = np.where(is_live, channels[0] * texture, channels[0]), channels[1]
    image, optics = _viability_optics(rng, params, live_ch, dead_ch)
    info = {"assay": assay, "live_fraction": live_fraction, **optics, "cells": len(classes) - 1}
    return image, labels, np.asarray(classes, np.uint8), info


def _paint_cell(rng: np.random.Generator, params: ViabilityParams, assay: str,
                canvas: tuple[np.ndarray, np.ndarray], mask: np.ndarray, centre: tuple[float, float], dead: bool,
                idx: int) -> bool:
    """Paint cell ``idx`` (its ``mask`` at ``centre``) into the ``canvas``: the labels and both stains' channels.

    True if painted (not off the image, not too small, not overlapping others too much).
    """
    labels, channels = canvas
    h, w = labels.shape
    r = mask.shape[0] // 2
    y0, x0 = int(round(centre[0])) - r, int(round(centre[1])) - r
    ys, xs = slice(max(y0, 0), min(y0 + mask.shape[0], h)), slice(max(x0, 0), min(x0 + mask.shape[1], w))
    if ys.start >= ys.stop or xs.start >= xs.stop:
        return False
    m = mask[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    if m.sum() < 12:
        return False
    taken = labels[ys, xs] > 0
    if (m & taken).sum() > params.max_overlap * m.sum():
        return False
    new = m & ~taken
    labels[ys, xs][new] = idx
    if assay == "live-dead":
        live_level = rng.uniform(0.0, 0.06) if dead else rng.uniform(0.45, 1.0)
        dead_level = rng.uniform(0.5, 1.0) if dead else rng.uniform(0.0, 0.04)
    else:
        live_level = rng.uniform(0.6, 1.0) if dead else rng.uniform(0.3, 0.65)
        dead_level = rng.uniform(0.5, 1.0) if dead else rng.uniform(0.0, 0.04)
    # cells are domes: the stain's signal follows the cell's height, highest at its centre,
    # so touching cells meet at a dimmer seam
    depth = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    dome = np.sqrt(depth / max(depth.max(), 1.0))[new]
    channels[0, ys, xs][new] = live_level * (0.45 + 0.55 * dome)
    channels[1, ys, xs][new] = dead_level * (0.6 + 0.4 * dome)
    return True


def _viability_optics(rng: np.random.Generator, params: ViabilityParams, live_ch: np.ndarray,
                      dead_ch: np.ndarray) -> tuple[np.ndarray, dict]:
    """Bleed-through between the stains, then optics and camera: a (2, H, W) uint16 image."""
    h, w = live_ch.shape
    b01, b10 = rng.uniform(*params.bleed), rng.uniform(*params.bleed)
    ch = np.stack([live_ch + b10 * dead_ch, dead_ch + b01 * live_ch])
    sigma = rng.uniform(*params.psf_sigma)
    ch = np.stack([ndi.gaussian_filter(c, sigma) for c in ch])
    amp = rng.uniform(*params.illumination)
    illum = 1.0 + amp * np.clip(_smooth_field(rng, (h, w), max(h, w) / 4), -2, 2) / 2
    ch = ch * illum[None]
    ch = ch + np.array([rng.uniform(*params.background) for _ in range(2)], np.float32)[:, None, None]
    photons = _log_uniform(rng, *params.photons)
    ch = rng.poisson(np.clip(ch, 0, None) * photons) / photons
    ch = ch + rng.normal(0, rng.uniform(*params.read_noise), ch.shape)
    image = np.clip(np.round(ch * 3800 + 100), 0, 4095).astype(np.uint16)
    return image, {"psf_sigma": sigma, "photons": photons, "illumination": amp, "bleed": (b01, b10)}


# ------------------------------------------------------------------ hard nuclei


@dataclass(frozen=True)
class HardNucleiParams:
    """Parameters of :func:`hard_nuclei_image` (ranges drawn uniformly unless said otherwise).

    The conditions the default nuclei model failed on in real images from
    other labs: nuclei 8-100 px across, dim ones beside bright ones (up to
    ``brightness_spread`` between nuclei of one image), large nuclei with
    dark nucleoli and speckled chromatin, crowded touching nuclei,
    micronuclei, 8-bit images with a small range, uneven background, defocus.
    """

    diameter: tuple[float, float] = (8.0, 100.0)  # median nucleus diameter of the image, px, log-uniform
    size_spread: tuple[float, float] = (0.75, 1.3)  # one nucleus's diameter / the image's
    cover: tuple[float, float] = (0.12, 0.5)  # share of the image nuclei are placed to cover
    max_nuclei: int = 140
    clustered: tuple[float, float] = (0.0, 0.9)
    max_overlap: float = 0.15
    brightness_spread: tuple[float, float] = (1.0, 20.0)  # brightest / dimmest nucleus, log-uniform
    chromatin: tuple[float, float] = (0.0, 0.45)  # speckle amplitude
    nucleoli: float = 0.7  # probability that a nucleus over 24 px carries dark nucleoli
    micronuclei: float = 0.3  # probability that an image has micronuclei
    psf_sigma: tuple[float, float] = (0.5, 1.6)
    defocus: float = 0.2  # probability of an extra defocus blur of up to 6 % of the diameter
    background: tuple[float, float] = (0.0, 0.12)
    gradient: tuple[float, float] = (0.0, 0.5)  # background ramp across the image, relative to the brightest nucleus
    illumination: tuple[float, float] = (0.0, 0.4)
    photons: tuple[float, float] = (15.0, 800.0)  # log-uniform, at intensity 1
    read_noise: tuple[float, float] = (0.002, 0.02)
    eight_bit: float = 0.4  # probability of an 8-bit image whose brightest pixel is 60-255


def hard_nuclei_image(rng: np.random.Generator, params: HardNucleiParams = HardNucleiParams(),
                      *, diameter: float | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """One synthetic fluorescence nuclei image with the conditions of :class:`HardNucleiParams`.

    Returns ``(image, labels, info)``: ``image`` (H, W) uint8 or uint16;
    ``labels`` (H, W) int32 with ids 1..N (nuclei and micronuclei; later
    nuclei painted under earlier ones, so labels never overlap); ``info``
    the drawn parameters.  The image side is about ten nucleus diameters
    (192-640 px).  ``diameter`` fixes the image's median nucleus diameter.
    """
    d = float(diameter) if diameter else _log_uniform(rng, *params.diameter)
    side = int(np.clip(round(d * 10 / 16) * 16, 192, 640))
    h = w = side
    cover = rng.uniform(*params.cover)
    n_target = int(min(params.max_nuclei, max(3, cover * h * w / (math.pi * d * d / 4))))
    clustered = rng.uniform(*params.clustered)
    centres = rng.uniform([0, 0], [h, w], size=(int(rng.integers(1, 4)), 2))
    spread_px = d * rng.uniform(1.0, 3.0)
    b_spread = _log_uniform(rng, *params.brightness_spread)
    canvas = _NucleiCanvas(rng, params, side, d, chromatin=rng.uniform(*params.chromatin))
    placed = 0
    for _ in range(n_target * 3):
        if placed >= n_target:
            break
        a = d / 2 * rng.uniform(*params.size_spread)
        mask = _cell_mask(rng, a, rng.uniform(0.6, 1.0), 0.05)
        if rng.random() < clustered:
            cy, cx = centres[int(rng.integers(len(centres)))] + rng.normal(0, spread_px, 2)
        else:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        level = 1.0 / _log_uniform(rng, 1.0, b_spread)
        placed += canvas.paint(mask, cy, cx, level, textured=True)
    n_micro = canvas.micronuclei(placed) if d >= 16 and rng.random() < params.micronuclei else 0
    image, optics = _hard_optics(rng, params, canvas.signal, d)
    info = {"diameter": d, "nuclei": placed, "micronuclei": n_micro, "brightness_spread": b_spread,
            "chromatin": canvas.chromatin, **optics, "side": side}
    return image, canvas.labels, info


class _NucleiCanvas:
    """The labels and the (noise-free) signal of a hard-nuclei image, painted nucleus by nucleus."""

    def __init__(self, rng: np.random.Generator, params: HardNucleiParams, side: int, d: float, chromatin: float):
        self.rng, self.params, self.side, self.d, self.chromatin = rng, params, side, d, chromatin
        self.labels = np.zeros((side, side), np.int32)
        self.signal = np.zeros((side, side), np.float32)
        self.speckle = _smooth_field(rng, (side, side), max(0.7, d / 14))
        self.count = 0

    def paint(self, mask: np.ndarray, cy: float, cx: float, level: float, textured: bool) -> bool:
        """Paint one nucleus (``mask`` centred at ``cy, cx``) where it does not overlap too much; True if painted."""
        rng, params, h = self.rng, self.params, self.side
        r0, r1 = mask.shape[0] // 2, mask.shape[1] // 2
        y0, x0 = int(round(cy)) - r0, int(round(cx)) - r1
        ys = slice(max(y0, 0), min(y0 + mask.shape[0], h))
        xs = slice(max(x0, 0), min(x0 + mask.shape[1], h))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            return False
        m = mask[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
        if m.sum() < 6:
            return False
        taken = self.labels[ys, xs] > 0
        if (m & taken).sum() > params.max_overlap * m.sum():
            return False
        new = m & ~taken
        self.count += 1
        self.labels[ys, xs][new] = self.count
        depth = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        dome = np.sqrt(depth / max(depth.max(), 1.0))
        profile = level * (rng.uniform(0.5, 0.9) + (1 - 0.7) * dome)
        if textured:
            profile = profile * np.clip(1 + self.chromatin * self.speckle[ys, xs], 0.15, None)
            if mask.shape[0] > 24 and rng.random() < params.nucleoli:
                profile = self._nucleoli(profile, m, depth, mask.shape[0])
        self.signal[ys, xs][new] = profile[new]
        return True

    def _nucleoli(self, profile: np.ndarray, m: np.ndarray, depth: np.ndarray, size: int) -> np.ndarray:
        """Dark nucleoli: 1-4 round holes in the chromatin, 6-14 % of the diameter across."""
        rng = self.rng
        inside = np.argwhere(depth > depth.max() * 0.35)
        for _ in range(int(rng.integers(1, 5))):
            if not len(inside):
                break
            py, px = inside[int(rng.integers(len(inside)))]
            rr = size * rng.uniform(0.03, 0.07)
            yy, xx = np.ogrid[: m.shape[0], : m.shape[1]]
            blob = np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * rr * rr))
            profile = profile * (1 - rng.uniform(0.35, 0.75) * blob)
        return profile

    def micronuclei(self, placed: int) -> int:
        """Small untextured nuclei beside random nuclei; returns how many were painted."""
        rng, d, n_micro = self.rng, self.d, 0
        for _ in range(int(rng.integers(2, 3 + placed // 4))):
            a = max(1.5, d / 2 * rng.uniform(0.15, 0.3))
            ids = np.unique(self.labels)[1:]
            if not len(ids):
                break
            ys, xs = np.nonzero(self.labels == ids[int(rng.integers(len(ids)))])
            ang = rng.uniform(0, 2 * math.pi)
            cy = ys.mean() + math.sin(ang) * (d * 0.7)
            cx = xs.mean() + math.cos(ang) * (d * 0.7)
            n_micro += self.paint(_cell_mask(rng, a, rng.uniform(0.7, 1.0), 0.02), cy, cx,
                                  rng.uniform(0.5, 1.0), textured=False)
        return n_micro


def _hard_optics(rng: np.random.Generator, params: HardNucleiParams, signal: np.ndarray,
                 d: float) -> tuple[np.ndarray, dict]:
    """Blur (and defocus), uneven illumination, background ramp, Poisson-Gaussian noise, 8 or 16 bits."""
    h, w = signal.shape
    side = h
    sigma = rng.uniform(*params.psf_sigma)
    if rng.random() < params.defocus:
        sigma = math.hypot(sigma, rng.uniform(0.02, 0.06) * d)
    img = ndi.gaussian_filter(signal, sigma)
    amp = rng.uniform(*params.illumination)
    img = img * (1.0 + amp * np.clip(_smooth_field(rng, (h, w), side / 4), -2, 2) / 2)
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[:h, :w].astype(np.float32) / side
    ramp = (yy * math.sin(ang) + xx * math.cos(ang))
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    img = img + rng.uniform(*params.background) + rng.uniform(*params.gradient) * ramp
    photons = _log_uniform(rng, *params.photons)
    img = rng.poisson(np.clip(img, 0, None) * photons) / photons
    img = img + rng.normal(0, rng.uniform(*params.read_noise), img.shape)
    eight_bit = rng.random() < params.eight_bit
    if eight_bit:
        top = rng.uniform(60, 255)
        image = np.clip(np.round(img / max(float(np.percentile(img, 99.9)), 1e-6) * top), 0, 255).astype(np.uint8)
    else:
        image = np.clip(np.round(img * 3800 + 100), 0, 4095).astype(np.uint16)
    return image, {"psf_sigma": sigma, "photons": photons, "eight_bit": bool(eight_bit)}
