"""Write synthetic "hard nuclei" images with their labels (``X_img.tif`` / ``X_labels.tif``).

    python scripts/make_hard_nuclei.py --out tests/data/hard_nuclei --first-seed 900000 --count 30

The images come from :func:`segstudio.core.training.synthetic.hard_nuclei_image`
(nuclei 8-100 px across, dim beside bright, nucleoli and chromatin texture,
touching, micronuclei, 8-bit with a small range, uneven background,
defocus). A seed gives the same image on every machine. The held-out set
in ``tests/data/hard_nuclei`` is seeds 900000-900029; training draws its
synthetic images from seeds below 100000, so the two never meet.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segstudio.core.image.io import write_labels  # noqa: E402
from segstudio.core.training.synthetic import hard_nuclei_image  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--first-seed", type=int, default=900000)
    ap.add_argument("--count", type=int, default=30)
    args = ap.parse_args()
    import tifffile

    args.out.mkdir(parents=True, exist_ok=True)
    index = []
    for seed in range(args.first_seed, args.first_seed + args.count):
        image, labels, info = hard_nuclei_image(np.random.default_rng(seed))
        stem = f"hard{seed}"
        tifffile.imwrite(args.out / f"{stem}_img.tif", image, compression="zlib", metadata=None)
        write_labels(args.out / f"{stem}_labels.tif", labels.astype(np.uint16))
        index.append({"file": stem, "seed": seed, **{k: (round(v, 3) if isinstance(v, float) else v)
                                                      for k, v in info.items()}})
        print(stem, index[-1], flush=True)
    (args.out / "info.json").write_text(json.dumps(index, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
