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
class UNetConfig:
    """Architecture of a :class:`~segstudio.core.models.unet.UNet`.

    ``depth`` is the number of poolings; level ``k`` has
    ``min(width * 2**k, max_width)`` channels.
    """

    in_channels: int = 1
    out_channels: int = 2
    depth: int = 3
    width: int = 32
    max_width: int = 256
    separable: bool = False

    def widths(self) -> list[int]:
        return [min(self.width * 2**k, self.max_width) for k in range(self.depth + 1)]

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2**self.depth

    def flops(self, h: int, w: int) -> int:
        """Floating-point operations (2 per multiply-add) of one forward pass on ``h`` x ``w``.

        Convolutions only (BatchNorm folds into them at inference; ReLU,
        pooling and concatenation are memory-bound and not counted).
        """
        widths = self.widths()
        macs = 0

        def conv3(cin: int, cout: int, px: int) -> int:
            if self.separable and cin > 1:
                return px * cin * 9 + px * cin * cout
            return px * cin * cout * 9

        cin = self.in_channels
        for k, wk in enumerate(widths):
            px = (h >> k) * (w >> k)
            macs += conv3(cin, wk, px) + conv3(wk, wk, px)
            cin = wk
        for k in reversed(range(self.depth)):
            px = (h >> k) * (w >> k)
            w_skip, w_deep = widths[k], widths[k + 1]
            macs += (px // 4) * w_deep * w_skip * 4  # 2x2 transposed convolution, stride 2
            macs += conv3(2 * w_skip, w_skip, px) + conv3(w_skip, w_skip, px)
        macs += h * w * widths[0] * self.out_channels
        return 2 * macs

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
    """Per-channel percentile normalization over the whole image."""

    low: float = 1.0
    high: float = 99.8


@dataclass(frozen=True)
class PostprocessParams:
    """Parameters of the foreground + distance watershed."""

    fg_threshold: float = 0.5
    seed_threshold: float = 0.5
    min_size: int = 8


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
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    license: str = ""

    @property
    def halo(self) -> int:
        """Tile halo: the receptive radius rounded up to the input multiple."""
        m = self.config.multiple
        r = self.config.receptive_radius()
        return -(-r // m) * m

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outputs"] = list(self.outputs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        try:
            d = dict(d)
            d["config"] = UNetConfig(**d.get("config", {}))
            d["normalization"] = Normalization(**d.get("normalization", {}))
            d["postprocess"] = PostprocessParams(**d.get("postprocess", {}))
            d["outputs"] = tuple(d.get("outputs", ()))
            return cls(**d)
        except TypeError as e:
            raise IncompatibleArtifactError(
                f"model description does not fit this version of segstudio: {e}",
                hint="re-export the model with this version",
            ) from None

    def card(self) -> str:
        """A short, human-readable model card."""
        lines = [
            f"{self.name} (v{self.version}): {self.title}",
            f"  {self.description}",
            f"  input: {self.input_channels} channel(s), normalized per channel to "
            f"percentiles {self.normalization.low}..{self.normalization.high} over the whole image",
            f"  architecture: {self.architecture} depth {self.config.depth}, width {self.config.width}"
            + (", depthwise-separable" if self.config.separable else ""),
            f"  output: {self.representation} -> instance labels by watershed",
        ]
        if self.pixel_scale:
            lines.append(f"  scale: {self.pixel_scale}")
        if self.trained_on:
            lines.append(f"  trained on: {self.trained_on}")
        for key, m in self.metrics.items():
            scores = ", ".join(f"{k.upper()} {m[k]:.3f}" for k in ("ap50", "ap75", "f1", "dice", "pq") if k in m)
            lines.append(f"  {key} ({m.get('images', '?')} images): {scores}")
            if "command" in m:
                lines.append(f"    reproduce: {m['command']}")
        return "\n".join(lines)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
