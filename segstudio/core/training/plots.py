"""Small PNG charts drawn with Pillow (a core dependency; matplotlib is optional)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def training_curves_png(path: str | Path, history: list[dict], *, title: str = "", size=(640, 360)) -> Path:
    """Training loss (blue, left scale) and validation AP50 (orange, right scale 0..1) against the step.

    ``history`` rows have ``step`` and ``loss`` and / or ``val_ap50``.  Written atomically.
    """
    from PIL import Image, ImageDraw

    from ..image.io import atomic_path

    w, h = size
    left, right, top, bottom = 56, 56, 28, 36
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    steps = [r["step"] for r in history] or [0]
    s_max = max(max(steps), 1)
    losses = [(r["step"], r["loss"]) for r in history if "loss" in r]
    aps = [(r["step"], r["val_ap50"]) for r in history if "val_ap50" in r]
    l_max = max([v for _, v in losses], default=1.0) * 1.05 or 1.0
    pw, ph = w - left - right, h - top - bottom
    d.rectangle([left, top, left + pw, top + ph], outline=(120, 120, 120))

    def xy(step, v, vmax):
        return left + pw * step / s_max, top + ph * (1 - v / vmax)

    for frac in np.linspace(0, 1, 5):
        y = top + ph * (1 - frac)
        d.line([left, y, left + pw, y], fill=(230, 230, 230))
        d.text((4, y - 6), f"{frac * l_max:.3f}", fill=(31, 119, 180))
        d.text((left + pw + 6, y - 6), f"{frac:.2f}", fill=(230, 120, 20))
    for series, vmax, colour in ((losses, l_max, (31, 119, 180)), (aps, 1.0, (230, 120, 20))):
        pts = [xy(s, v, vmax) for s, v in series]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    d.text((left, 8), title, fill="black")
    d.text((left, h - 20), f"step (0-{s_max})   blue: training loss   orange: validation AP50", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
