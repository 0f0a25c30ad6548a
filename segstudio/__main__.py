"""``python -m segstudio``: open the standalone app (``segstudio gui``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["gui", *sys.argv[1:]]))
