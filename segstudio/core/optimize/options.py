"""Typed specifications of the optimization steps and their options.

Every step (:mod:`.steps`) declares its positional argument and its options
as :class:`OptionSpec` objects: name, type, default, allowed values or range,
and a sentence of help.  The command line parses ``prune:0.5:mode=global``
with them, and the GUI's Advanced view is generated from them, so an option
added here appears in both without GUI code, and a bad value gets the same
message (naming the allowed values) everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    from .steps import Step

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


@dataclass(frozen=True)
class OptionSpec:
    """One option of a step (or its positional argument).

    ``kind`` is ``bool``, ``int``, ``float`` or ``str``; ``choices`` lists the
    values a text option may take; ``low`` / ``high`` bound a number
    (inclusive; ``None``: unbounded), and ``open_low`` / ``open_high`` make a
    bound exclusive (a ratio strictly between 0 and 1).
    """

    name: str
    kind: type
    default: Any
    help: str = ""
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def allowed(self) -> str:
        """The values this option accepts, in words."""
        if self.kind is bool:
            return "true or false"
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.kind in (int, float):
            what = "a whole number" if self.kind is int else "a number"
            show = (lambda x: f"{int(x):,}") if self.kind is int else (lambda x: f"{x:g}")
            lo = None if self.low is None else (f"above {show(self.low)}" if self.open_low else f"at least {show(self.low)}")
            hi = None if self.high is None else (f"below {show(self.high)}" if self.open_high else f"at most {show(self.high)}")
            if lo and hi and not (self.open_low or self.open_high):
                return f"{what} from {show(self.low)} to {show(self.high)}"
            return " ".join([what, " and ".join(x for x in (lo, hi) if x)]).strip()
        return "any text"

    def parse(self, value: Any, where: str = "") -> Any:
        """``value`` (text from the command line or a field, or a value) as this option's type.

        Raises :class:`InputError` naming the option and the allowed values.
        """
        where = where or self.name

        def refuse():
            return InputError(f"{where} must be {self.allowed()}, not {value!r}")

        if self.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in _TRUE + _FALSE:
                raise refuse()
            return text in _TRUE
        if self.kind in (int, float):
            if isinstance(value, bool):
                raise refuse()
            try:
                number = float(value) if self.kind is float else _whole(value)
            except (TypeError, ValueError):
                raise refuse() from None
            if not math.isfinite(number):
                raise refuse()
            if self.low is not None and (number < self.low or (self.open_low and number == self.low)):
                raise refuse()
            if self.high is not None and (number > self.high or (self.open_high and number == self.high)):
                raise refuse()
            return number
        text = str(value).strip()
        if self.choices is not None:
            if text.lower() in self.choices:
                return text.lower()
            raise refuse()
        return text

    def text(self, value: Any) -> str:
        """``value`` written as the command line writes it (``parse(text(v)) == v``)."""
        if self.kind is bool:
            return "true" if value else "false"
        if self.kind is float:
            return f"{float(value):g}"
        return str(value)


def _whole(value: Any) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    text = str(value).strip().replace("_", "")
    try:
        return int(text)
    except ValueError:
        f = float(text)  # "1e3", "2500.0"
        if not f.is_integer():
            raise ValueError(value) from None
        return int(f)


@dataclass(frozen=True)
class StepSpec:
    """What a step is and what it takes: the CLI parses with it, the GUI draws its Advanced view from it."""

    name: str
    title: str
    doc: str
    argument: OptionSpec | None
    options: tuple[OptionSpec, ...]
    cls: type

    def option(self, name: str) -> OptionSpec:
        for o in self.options:
            if o.name == name:
                return o
        raise InputError(f"step {self.name} has no option {name}"
                         f" (options: {', '.join(o.name for o in self.options) or 'none'})")

    def make(self, arg: Any = None, **opts: Any) -> "Step":
        """A step with these values (text or typed), each parsed and checked."""
        return self.cls(arg, **opts)
