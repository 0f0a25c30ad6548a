"""Write the benchmark image: a SIZE x SIZE uint16 mosaic of the bundled crowded sample.

    python benchmarks/make_image.py 2048 /tmp/bench2048.tif

The same pixels as benchmarks/scaling.py uses (mirrored mosaic, 12-bit).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scaling import make_image  # noqa: E402

if __name__ == "__main__":
    size, path = int(sys.argv[1]), Path(sys.argv[2])
    make_image(path, size, "contiguous")
    print(f"wrote {path} ({size}x{size} uint16)")
