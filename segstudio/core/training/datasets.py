"""Pairing images with their label files.

Two layouts are understood:

* one folder holding ``X_img.tif`` and ``X_labels.tif`` (the layout of the
  DSB2018 copy in ``../shared/data/dsb2018`` and of ``sample_data/``);
* two folders holding files with the same stem (``a.tif`` / ``a.png``).

An ``index.json`` next to the images (a list of ``{"file": "val/<stem>",
"kind": ...}``) lets callers keep one kind of image (``--kind fluorescence``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..image.io import IMAGE_SUFFIXES

IMG_TAG = "_img"
LABEL_TAG = "_labels"


@dataclass(frozen=True)
class Pair:
    name: str
    image: Path
    labels: Path


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _strip_tag(stem: str, tag: str) -> str | None:
    return stem[: -len(tag)] if stem.endswith(tag) else None


def find_pairs(images: str | Path, labels: str | Path, *, kind: str | None = None) -> list[Pair]:
    """Pair image files in ``images`` with label files in ``labels`` by stem.

    Raises :class:`InputError` when nothing pairs up, so that a wrong folder
    is reported rather than evaluated as "0 images".
    """
    images, labels = Path(images), Path(labels)
    label_files = {p.stem: p for p in _images_in(labels)}
    pairs = []
    for img in _images_in(images):
        base = _strip_tag(img.stem, IMG_TAG)
        if base is not None and base + LABEL_TAG in label_files:
            pairs.append(Pair(base, img, label_files[base + LABEL_TAG]))
        elif images != labels and img.stem in label_files:
            pairs.append(Pair(img.stem, img, label_files[img.stem]))
    if kind is not None:
        kinds = read_kinds(images)
        if not kinds:
            raise InputError(
                f"--kind {kind} needs an index.json describing the images in {images} or its parent",
            )
        known = {k for k in kinds.values()}
        if kind not in known:
            raise InputError(f"no image of kind {kind!r}; kinds in index.json: {', '.join(sorted(known))}")
        pairs = [p for p in pairs if kinds.get(p.name) == kind]
    if not pairs:
        raise InputError(
            f"no image/label pairs found in {images} and {labels}",
            hint="name them X_img.tif / X_labels.tif, or give two folders with the same file names",
        )
    return pairs


def find_images(folder: str | Path, *, kind: str | None = None) -> list[Path]:
    """The image files in ``folder`` (label files ``X_labels.*`` left out), of ``kind`` when given (index.json)."""
    folder = Path(folder)
    files = [p for p in _images_in(folder) if _strip_tag(p.stem, LABEL_TAG) is None and not p.name.startswith(".")]
    if kind is not None:
        kinds = read_kinds(folder)
        files = [p for p in files if kinds.get(_strip_tag(p.stem, IMG_TAG) or p.stem) == kind]
    if not files:
        raise InputError(f"no images in {folder}" + (f" of kind {kind!r}" if kind else ""))
    return files


INDEX_HINT = 'index.json must be a JSON list of {"file": "<folder>/<stem>", "kind": "<kind>"} entries'


def read_kinds(folder: Path) -> dict[str, str]:
    """Map stem -> kind from an ``index.json`` in ``folder`` or its parent.

    A file that is not such a list (not JSON, not a list, an entry without a
    ``file`` or ``kind`` string) is an :class:`InputError` naming it.
    """
    for candidate in (folder / "index.json", folder.parent / "index.json"):
        if candidate.is_file():
            try:
                entries = json.loads(candidate.read_bytes())
            except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise InputError(f"{candidate}: not a readable JSON file ({e})", hint=INDEX_HINT) from None
            if not isinstance(entries, list):
                raise InputError(f"{candidate}: expected a list of entries, found a JSON {type(entries).__name__}",
                                 hint=INDEX_HINT)
            kinds = {}
            for i, e in enumerate(entries):
                if not (isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("kind"), str)):
                    raise InputError(f"{candidate}: entry {i} is not an object with a \"file\" and a \"kind\" string "
                                     f"({json.dumps(e)[:80]})", hint=INDEX_HINT)
                kinds[Path(e["file"]).name] = e["kind"]
            return kinds
    return {}


def mismatch_error(pair: Pair, labels_shape, image_shape) -> InputError:
    """The error for a labels file whose shape is not its image's."""
    def dims(shape) -> str:
        return "x".join(str(int(n)) for n in shape)

    return InputError(f"{pair.labels}: labels of {dims(labels_shape)} px do not match the image {pair.image} "
                      f"({dims(image_shape)} px)", hint="a labels file must have its image's planes, height and width")


def read_pair(pair: Pair):
    """``(ImageData, labels)`` of a pair, refusing labels whose height and width are not the image's."""
    from ..image.sources import read_image

    image = read_image(pair.image)
    labels = read_image(pair.labels).data
    if labels.shape[-2:] != image.plane_shape:
        raise mismatch_error(pair, labels.shape, image.plane_shape)
    return image, labels

