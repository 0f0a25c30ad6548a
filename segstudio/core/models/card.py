"""Model cards: the :class:`Model` a card describes, reading (verified) and writing cards.

A model is a *card* (``<name>.json``: the :class:`ModelSpec` plus the files
that hold its weights, with their SHA-256) and the files next to it: a
PyTorch state dict (``.pt``, loaded with ``weights_only=True``) and/or an
ONNX file.  :mod:`.catalog` finds models by name; :mod:`.user` imports
the user's own into cards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IncompatibleArtifactError
from .spec import ModelSpec, file_sha256

BUILTIN_DIR = Path(__file__).parent / "builtin"


@dataclass
class Model:
    """A model spec plus its weight files (format -> path)."""

    spec: ModelSpec
    files: dict[str, Path]
    card_path: Path
    provenance: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def file(self, fmt: str) -> Path:
        if fmt not in self.files:
            raise IncompatibleArtifactError(
                f"model {self.name!r} has no {fmt} file (it has: {', '.join(self.files) or 'none'})"
            )
        return self.files[fmt]


def _is_card(path: Path) -> bool:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and "spec" in payload and "files" in payload


def load_card(card: str | Path, *, verify: bool = True) -> Model:
    """Read a model card and check that its files exist (and match their hash).

    With ``verify``, the ONNX files of a card that does not ship with
    segstudio are also checked as untrusted data
    (:func:`~segstudio.core.models.onnx_check.check_onnx_file`: external
    data inside the folder, no custom operators, bounded loops) before any
    backend opens them.

    Parameters
    ----------
    card : str or pathlib.Path
        The card (``<name>.json``); every file it names must sit in its folder.
    verify : bool
        Check each file against the SHA-256 the card records (if any) and,
        for a card outside the built-in folder, check its ``onnx*`` files
        and refuse a ``torch`` file that is a TorchScript archive.  Whether
        the files exist next to the card is checked either way.

    Returns
    -------
    Model
        The spec, the files (format -> path) and the card's provenance.

    Raises
    ------
    IncompatibleArtifactError
        An unreadable or damaged card; a file that is missing or not next to
        the card; with ``verify``, a checksum mismatch or an ONNX file that
        :func:`~segstudio.core.models.onnx_check.check_onnx_file` refuses.
    ModelRefusedError
        With ``verify``, a ``torch`` file that is a TorchScript archive (code).
    """
    card = Path(card)
    try:
        payload = json.loads(card.read_text())
    except (OSError, ValueError) as e:
        raise IncompatibleArtifactError(f"{card}: not a readable model card ({e})") from None
    if not isinstance(payload, dict) or "spec" not in payload:
        raise IncompatibleArtifactError(f"{card}: not a segstudio model card (no model description in it)")
    try:
        spec = ModelSpec.from_dict(payload["spec"])
    except (KeyError, TypeError, ValueError) as e:
        raise IncompatibleArtifactError(f"{card}: the model description is incomplete or damaged ({e})") from None
    files = {}
    entries = payload.get("files", {})
    if not isinstance(entries, dict):
        raise IncompatibleArtifactError(f"{card}: not a segstudio model card (its files are not a mapping)")
    for fmt, entry in entries.items():
        path = card.parent / str(entry.get("path", "")) if isinstance(entry, dict) else card.parent
        if path.resolve().parent != card.parent.resolve():
            raise IncompatibleArtifactError(f"{card.name}: its {fmt} file must sit next to the card "
                                            f"(it names {entry.get('path') if isinstance(entry, dict) else entry!r})")
        if not path.is_file():
            raise IncompatibleArtifactError(f"{card.name}: its {fmt} file {path.name} is missing")
        if verify and entry.get("sha256") and file_sha256(path) != entry["sha256"]:
            raise IncompatibleArtifactError(
                f"{path.name} does not match the checksum in {card.name}",
                hint="the file is damaged or was replaced; reinstall or re-export the model",
            )
        files[fmt] = path
    if verify and card.parent.resolve() != BUILTIN_DIR.resolve():
        from .onnx_check import check_onnx_file
        from .archives import is_torchscript_archive, refuse_code

        for fmt, path in files.items():
            if fmt.startswith("onnx"):
                check_onnx_file(path)
            elif fmt == "torch" and _starts_with(path, b"PK") and is_torchscript_archive(path):
                raise refuse_code(path)  # weights, the card says; code, the file says
    return Model(spec=spec, files=files, card_path=card, provenance=payload.get("provenance", {}))


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def write_card(spec: ModelSpec, files: dict[str, Path], card: str | Path, provenance: dict | None = None) -> Path:
    """Write ``card`` describing ``spec`` and ``files`` (which must sit next to it).

    ``provenance`` (what the model was made from, how, with what) is kept
    in the card as it is.

    Parameters
    ----------
    spec : ModelSpec
    files : dict of str to pathlib.Path
        Format (``"onnx"``, ``"torch"``...) -> file in the card's folder; each
        file's name, SHA-256 and size are recorded.
    card : str or pathlib.Path
        The card file to write (replaced if it exists).
    provenance : dict, optional
        Stored under ``"provenance"``; left out when None or empty.

    Returns
    -------
    pathlib.Path
        ``card``.

    Raises
    ------
    ValueError
        A file that is not in the card's folder.
    """
    card = Path(card)
    entries = {}
    for fmt, path in files.items():
        path = Path(path)
        if path.parent.resolve() != card.parent.resolve():
            raise ValueError("model files must sit next to their card")
        entries[fmt] = {"path": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}
    payload = {"spec": spec.to_dict(), "files": entries}
    if provenance:
        payload["provenance"] = provenance
    card.write_text(json.dumps(payload, indent=1) + "\n")
    return card


def model_digest(model: Model) -> str:
    """A short hash identifying a model by its files' contents.

    Parameters
    ----------
    model : Model

    Returns
    -------
    str
        16 hex digits of a SHA-256 over each format name and its file's
        SHA-256, in format order (the card's spec and provenance do not count).
    """
    import hashlib

    h = hashlib.sha256()
    for fmt in sorted(model.files):
        h.update(fmt.encode() + file_sha256(model.files[fmt]).encode())
    return h.hexdigest()[:16]
