"""What a model expects and returns, as plain data (no torch).

A :class:`ModelSpec` travels with every model file as a JSON sidecar (an
:class:`Artifact`), so that any backend, the tiler and the post-processing
know how to feed the model and read its output without importing the
framework that trained it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IncompatibleArtifactError


@dataclass(frozen=True)
class LayerWidths:
    """Output channels of every convolution of a U-Net (what structured pruning changes).

    Per level ``k``: the encoder block's inner and output widths
    (``enc_mid[k]``, ``enc_out[k]``); per decoder level ``k < depth``: the
    transposed convolution's output (``up[k]``) and the decoder block's inner
    and output widths (``dec_mid[k]``, ``dec_out[k]``).
    """

    enc_mid: tuple[int, ...]
    enc_out: tuple[int, ...]
    up: tuple[int, ...]
    dec_mid: tuple[int, ...]
    dec_out: tuple[int, ...]

    def as_dict(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`~segstudio.core.models.unet.UNet`.

    ``depth`` is the number of poolings; level ``k`` has
    ``min(width * 2**k, max_width)`` channels, unless ``layers`` gives every
    convolution's width (a pruned network).
    """

    in_channels: int = 1
    out_channels: int = 2
    depth: int = 3
    width: int = 32
    max_width: int = 256
    separable: bool = False
    layers: LayerWidths | None = None
    # > 0: the network's first operation compresses its normalized input, ``asinh(x / c) / asinh(1 / c)``
    # (1 stays 1; intensities near c and below are lifted about ``1 / (c asinh(1 / c))`` times, bright
    # nuclei compressed), so nuclei many times dimmer than the brightest still reach the first layer.
    # In the graph, not in preprocessing: every backend and every export, INT8 included, does the same,
    # and training's intensity augmentation stays in linear intensity.
    input_asinh: float = 0.0

    def widths(self) -> list[int]:
        return [min(self.width * 2**k, self.max_width) for k in range(self.depth + 1)]

    def layer_widths(self) -> LayerWidths:
        if self.layers is not None:
            return self.layers
        w = tuple(self.widths())
        return LayerWidths(enc_mid=w, enc_out=w, up=w[:-1], dec_mid=w[:-1], dec_out=w[:-1])

    def with_layers(self, layers: LayerWidths) -> "UNetConfig":
        from dataclasses import replace

        return replace(self, layers=layers)

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2**self.depth

    def conv_layers(self) -> list[tuple[str, int, int, int, int]]:
        """Every convolution as ``(name, c_in, c_out, kernel, level)`` in network order.

        ``kernel`` is 3 (3x3, depthwise-separable when ``separable``), 2 (2x2
        transposed, stride 2, producing ``level``) or 1.  The builder and the
        FLOP count both read this one list.
        """
        lw = self.layer_widths()
        out = []
        cin = self.in_channels
        for k in range(self.depth + 1):
            out.append((f"encoders.{k}.0", cin, lw.enc_mid[k], 3, k))
            out.append((f"encoders.{k}.1", lw.enc_mid[k], lw.enc_out[k], 3, k))
            cin = lw.enc_out[k]
        deep = lw.enc_out[self.depth]
        for j, k in enumerate(reversed(range(self.depth))):
            out.append((f"ups.{j}", deep, lw.up[k], 2, k))
            out.append((f"decoders.{j}.0", lw.enc_out[k] + lw.up[k], lw.dec_mid[k], 3, k))
            out.append((f"decoders.{j}.1", lw.dec_mid[k], lw.dec_out[k], 3, k))
            deep = lw.dec_out[k]
        out.append(("head", deep, self.out_channels, 1, 0))
        return out

    def flops(self, h: int, w: int) -> int:
        """Floating-point operations (2 per multiply-add) of one forward pass on ``h`` x ``w``.

        Convolutions only (BatchNorm folds into them at inference; ReLU,
        pooling and concatenation are memory-bound and not counted).
        """
        macs = 0
        for _, cin, cout, kernel, level in self.conv_layers():
            px = (h >> level) * (w >> level)
            if kernel == 3:
                macs += px * cin * 9 + px * cin * cout if self.separable and cin > 1 else px * cin * cout * 9
            elif kernel == 2:
                macs += (px // 4) * cin * cout * 4  # stride 2: one input pixel feeds a 2x2 output patch
            else:
                macs += px * cin * cout
        return 2 * macs

    def parameters(self) -> int:
        """Number of weights (convolutions with BatchNorm folded in, plus biases)."""
        n = 0
        for _, cin, cout, kernel, _ in self.conv_layers():
            if kernel == 3:
                n += (cin * 9 + cin * cout if self.separable and cin > 1 else cin * cout * 9) + cout
            else:
                n += cin * cout * kernel * kernel + cout
        return n

    @property
    def halo(self) -> int:
        """Tile halo: :meth:`receptive_radius` rounded up to :attr:`multiple`."""
        return -(-self.receptive_radius() // self.multiple) * self.multiple

    def receptive_radius(self) -> int:
        """Upper bound, in input pixels, of how far an output pixel "sees".

        Two 3x3 convolutions per encoder level ``k = 0..depth`` add
        ``2 * 2**k``; each 2x2 pooling adds ``2**k``; each decoder level adds
        ``2 * 2**k`` for its convolutions and ``2**k`` for the transposed
        convolution's alignment.
        """
        d = self.depth
        enc = 2 * (2 ** (d + 1) - 1)
        pools = 2**d - 1
        dec = 2 * (2**d - 1) + (2**d - 1)
        return enc + pools + dec


@dataclass(frozen=True)
class Normalization:
    """Per-channel normalization over the whole image.

    ``mode``: ``"percentile"`` maps the ``low`` / ``high`` percentiles to
    0 / 1; ``"meanstd"`` subtracts the mean and divides by the standard
    deviation (BioImage.IO's ``zero_mean_unit_variance``); ``"none"`` passes
    intensities through.  ``eps`` is added to the divisor (the span between
    the percentiles, or the standard deviation), as BioImage.IO's
    ``scale_range`` and ``zero_mean_unit_variance`` do (their default: 1e-6).
    """

    low: float = 1.0
    high: float = 99.8
    mode: str = "percentile"
    eps: float = 0.0


@dataclass(frozen=True)
class PostprocessParams:
    """Parameters of the foreground + distance watershed."""

    fg_threshold: float = 0.5
    seed_threshold: float = 0.5
    min_size: int = 8
    # give background that one object alone encloses (a nucleolus left out) to that object
    fill_holes: bool = False


@dataclass
class ModelSpec:
    """Everything the app needs to run a model and explain it to the user."""

    name: str
    version: str
    title: str
    description: str
    architecture: str = "unet"
    config: UNetConfig = field(default_factory=UNetConfig)
    input_channels: int = 1
    outputs: tuple[str, ...] = ("foreground_logit", "distance_logit")
    representation: str = "fg_dist"
    normalization: Normalization = field(default_factory=Normalization)
    postprocess: PostprocessParams = field(default_factory=PostprocessParams)
    trained_on: str = ""
    pixel_scale: str = ""
    median_diameter_px: float | None = None
    # nuclei diameter (px) the network was trained at; images are resampled to it (None: native pixels)
    diameter: float | None = None
    # per-cell classes, e.g. ("live", "dead"): output channel 2 is the logit of the second class
    classes: tuple[str, ...] = ()
    # "logit" (built-in models) or "probability" (outputs already passed through a sigmoid)
    output_kind: str = "logit"
    # tile overlap and input size multiple for networks that are not built-in U-Nets (user models)
    halo_px: int | None = None
    multiple_px: int | None = None
    # input sizes the network takes (halo included), when it does not take any multiple of `multiple`:
    # (height, width) = input_min + n * input_step (n >= 0), or exactly input_min when input_step is (0, 0)
    input_min: tuple[int, int] | None = None
    input_step: tuple[int, int] | None = None
    # the largest batch of tiles the network takes (None: any)
    max_batch: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    license: str = ""

    @property
    def halo(self) -> int:
        """Tile halo: the receptive radius rounded up to the input multiple (or as the model declares)."""
        return self.config.halo if self.halo_px is None else -(-self.halo_px // self.multiple) * self.multiple

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return self.config.multiple if self.multiple_px is None else self.multiple_px

    @property
    def fixed_input(self) -> tuple[int, int] | None:
        """The one input (height, width) the network takes, or None when it takes several."""
        return self.input_min if self.input_min is not None and tuple(self.input_step or (0, 0)) == (0, 0) else None

    def input_size(self, want: tuple[int, int]) -> tuple[int, int] | None:
        """The smallest input (height, width) the network takes that is at least ``want``.

        None for a network without declared sizes (it takes any multiple of
        :attr:`multiple`); a fixed-size network always gets its size.
        """
        if self.input_min is None:
            return None
        step = self.input_step or (0, 0)
        out = []
        for n, lo, s in zip(want, self.input_min, step):
            out.append(lo if s == 0 else lo + max(0, -(-(int(n) - lo) // s)) * s)
        return out[0], out[1]

    def tile_shape(self, tile: int, plane: tuple[int, int], halo: int | None = None) -> tuple[int, int] | None:
        """The (height, width) of every tile, halo included, for ``tile``-pixel cores over ``plane``.

        None when the network takes any multiple of :attr:`multiple` (the
        tiler then sizes tiles itself, see
        :func:`segstudio.core.segment.tiling.plan_tiles`); otherwise the smallest size
        the network takes that holds what the tiler would read.
        """
        if self.input_min is None:
            return None
        m = self.multiple
        halo = self.halo if halo is None else -(-halo // m) * m
        want = [min(-(-tile // m) * m, -(-n // m) * m) + 2 * halo for n in plane]
        return self.input_size((want[0], want[1]))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outputs"] = list(self.outputs)
        d["classes"] = list(self.classes)
        for key in ("input_min", "input_step"):
            d[key] = None if d[key] is None else list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        try:
            d = dict(d)
            cfg = dict(d.get("config", {}))
            if cfg.get("layers") is not None:
                cfg["layers"] = LayerWidths(**{k: tuple(v) for k, v in cfg["layers"].items()})
            d["config"] = UNetConfig(**cfg)
            d["normalization"] = Normalization(**d.get("normalization", {}))
            d["postprocess"] = PostprocessParams(**d.get("postprocess", {}))
            d["outputs"] = tuple(d.get("outputs", ()))
            d["classes"] = tuple(d.get("classes", ()))
            for key in ("input_min", "input_step"):  # cards written before these fields lack them
                if d.get(key) is not None:
                    d[key] = tuple(int(v) for v in d[key])
            return cls(**d)
        except TypeError as e:
            raise IncompatibleArtifactError(
                f"model description does not fit this version of segstudio: {e}",
                hint="re-export the model with this version",
            ) from None

    def card(self) -> str:
        """A short, human-readable model card."""
        norm = self.normalization
        scaling = {"meanstd": "zero mean and unit variance", "none": "nothing (used as they are)"}.get(
            norm.mode, f"percentiles {norm.low}..{norm.high}")
        sizes = ""
        if self.fixed_input is not None:
            sizes = f"; takes {self.fixed_input[0]}x{self.fixed_input[1]} tiles only"
        elif self.input_min is not None:
            sizes = (f"; takes tiles of {self.input_min[0]}x{self.input_min[1]} + n x "
                     f"{self.input_step[0]}x{self.input_step[1]}" if self.input_step else "")
        if self.max_batch:
            sizes += f", {self.max_batch} at a time"
        lines = [
            f"{self.name} (v{self.version}): {self.title}",
            f"  {self.description}",
            f"  input: {self.input_channels} channel(s), normalized per channel to {scaling} over the whole image"
            + sizes
            + (f"; the network first compresses it by asinh(x / {self.config.input_asinh:g})"
               if self.config.input_asinh else ""),
            (f"  architecture: {self.architecture} depth {self.config.depth}, width {self.config.width}"
             + (", depthwise-separable" if self.config.separable else "")) if self.architecture == "unet"
            else f"  architecture: {self.architecture} (an imported network)",
            f"  output: {self.representation} -> instance labels by watershed"
            + (f", a class per cell ({' / '.join(self.classes)})" if self.classes else ""),
        ]
        if self.pixel_scale:
            lines.append(f"  scale: {self.pixel_scale}")
        if self.trained_on:
            lines.append(f"  trained on: {self.trained_on}")
        for key, m in self.metrics.items():
            if "network_speedup" in m:
                lines.append(f"  CPU speed vs {m['against']}: network {m['network_speedup']:.2f}x "
                             f"({m['network_ms_4x512']:.0f} vs {m['against_network_ms_4x512']:.0f} ms per 4 tiles "
                             f"of 512 px), end to end {m['end_to_end_speedup']:.2f}x on {m['backend']}")
                lines.append(f"    reproduce: {m['command']}")
                continue
            if "per_ratio" in m:
                lines.append(f"  {key}: live/dead per-cell F1 >= {m['min_class_f1']:.3f} at every live:dead ratio "
                             f"from 1:20 to 20:1; AP50 {m['ap50']:.3f} ({m['images']} images)")
                lines.append(f"    reproduce: {m['command']}")
                continue
            scores = ", ".join(f"{k.upper()} {m[k]:.3f}" for k in ("ap50", "ap75", "f1", "dice", "pq") if k in m)
            lines.append(f"  {key} ({m.get('images', '?')} images): {scores}")
            if "command" in m:
                lines.append(f"    reproduce: {m['command']}")
        return "\n".join(lines)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's contents (read in 1 MiB chunks).

    Parameters
    ----------
    path : str or pathlib.Path

    Returns
    -------
    str
        64 lower-case hex digits.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
