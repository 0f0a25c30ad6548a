"""Typed segmentation options, built once at the edge (CLI, panels, ``segstudio.segment``) and passed down.

:class:`SegmentOptions` is everything a segmentation can be asked to do
differently (tiling, batching, threads, scale, channel, flips, whether to
measure); :class:`Diameter` is the scale request as one typed value instead
of a float, the string ``"native"`` and a separate micrometre argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

DIAMETER_PX = (1.0, 10000.0)
DIAMETER_UM = (0.01, 10000.0)
DEFAULT_CONTEXT = 64


@dataclass(frozen=True)
class Diameter:
    """How big the nuclei are, so a model trained at one size sees them at that size.

    ``kind``: ``"auto"`` (estimated from the image), ``"native"`` (the
    image runs as it is), ``"px"`` (``value`` image pixels) or ``"um"``
    (``value`` micrometres; the image must record its pixel size).
    """

    kind: Literal["auto", "native", "px", "um"] = "auto"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "native", "px", "um"):
            raise ValueError(f"a diameter is auto, native, px or um, not {self.kind!r}")
        if (self.value is None) != (self.kind in ("auto", "native")):
            raise ValueError(f"a diameter of kind {self.kind!r} " + ("needs" if self.value is None else "takes no")
                             + " value")
        if self.value is not None:
            lo, hi = DIAMETER_UM if self.kind == "um" else DIAMETER_PX
            if not (math.isfinite(self.value) and lo <= self.value <= hi):
                raise ValueError(f"a diameter in {self.kind} is from {lo:g} to {hi:g}, not {self.value!r}")

    @classmethod
    def parse(cls, text: str) -> Diameter:
        """``"auto"``, ``"native"``, pixels (``"24"``, ``"24px"``) or micrometres (``"9um"``, ``"9µm"``).

        Raises :class:`ValueError` with the accepted forms.
        """
        t = str(text).strip().lower()
        if t in ("auto", "native"):
            return cls(t)
        micrometres = t.endswith(("um", "µm"))
        number = t.rstrip("uµm").strip() if micrometres else t.removesuffix("px").strip()
        try:
            return cls("um" if micrometres else "px", float(number))
        except ValueError:
            raise ValueError(
                f"must be auto, native, pixels from {DIAMETER_PX[0]:g} to {DIAMETER_PX[1]:g} (e.g. 24) or "
                f"micrometres from {DIAMETER_UM[0]:g} to {DIAMETER_UM[1]:g} (e.g. 9um), not {text!r}") from None

    @classmethod
    def of(cls, value: Diameter | float | str | None) -> Diameter:
        """``value`` as a :class:`Diameter`: ``None`` is auto, a number is pixels, a string is parsed."""
        if isinstance(value, Diameter):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls.parse(value)
        return cls("px", float(value))

    def pixels(self, pixel_size: tuple[float, float] | None, *, name: str = "the image") -> float | None:
        """The diameter in image pixels (``None``: to be estimated; ``native`` is handled by the caller).

        Raises :class:`~segstudio.core.errors.InputError` for micrometres on
        an image without a pixel size.
        """
        if self.kind == "px":
            return self.value
        if self.kind == "um":
            from ..errors import InputError
            from .scale import diameter_from_microns

            if pixel_size is None:
                raise InputError(f"{name}: the file does not record its pixel size, so a diameter in micrometres "
                                 "cannot be converted", hint="give the diameter in pixels")
            return diameter_from_microns(self.value, (pixel_size[0] + pixel_size[1]) / 2)
        return None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.value:g}{self.kind}"


@dataclass(frozen=True)
class SegmentOptions:
    """What a segmentation can be asked to do differently; the defaults are the recommended settings.

    Attributes
    ----------
    channel : int, str or None
        The channel holding the nuclei (index or name) in a multi-channel
        image, ``"mean"`` for the mean of the channels, ``None``: the
        model's own choice.
    tile : int
        Tile side in network pixels (the labels do not depend on it; memory does).
    batch_size : int or None
        Tiles per network call (default: 4 on a CPU, 16 on a GPU).
    context : int
        Pixels around each tile that post-processing sees: objects up to
        about that size are never cut at tile seams.
    post_workers : int or None
        Threads post-processing blocks (default: 1 beside a CPU network,
        up to 8 beside a GPU).
    diameter : Diameter
        The nuclei's size (a number, ``"native"`` or ``"9um"`` are accepted
        and converted).
    tta : bool
        Average the network over four flips (four times the work).
    measure_cells : bool
        Measure each object (the per-cell table); off for scoring runs.
    """

    channel: int | str | None = None
    tile: int = 512
    batch_size: int | None = None
    context: int = DEFAULT_CONTEXT
    post_workers: int | None = None
    diameter: Diameter = field(default_factory=Diameter)
    tta: bool = False
    measure_cells: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "diameter", Diameter.of(self.diameter))
        for name in ("tile", "context"):
            if int(getattr(self, name)) < (1 if name == "tile" else 0):
                raise ValueError(f"{name} must be positive, not {getattr(self, name)!r}")
        for name in ("batch_size", "post_workers"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")

    def but(self, **changes) -> SegmentOptions:
        """A copy with ``changes`` (field names of this class)."""
        return replace(self, **changes)
