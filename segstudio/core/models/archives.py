"""Model archives read without trusting them: zip limits, safe extraction, spotting TorchScript code.

Below both the card loader (:mod:`.catalog`, which refuses a card whose
"weights" are a TorchScript archive) and the importers (:mod:`.user`).
Nothing here unpickles or runs anything from a file.
"""

from __future__ import annotations

import io
import re
import stat
import zipfile
from pathlib import Path

from ..errors import IncompatibleArtifactError, InputError

# zips (BioImage.IO packages, PyTorch archives) are checked against these before anything is extracted
MAX_ZIP_BYTES = 1 << 30  # what all entries extract to
MAX_ZIP_ENTRIES = 10_000
MAX_ZIP_RATIO = 200  # extracted / compressed, for an entry of more than ZIP_RATIO_FLOOR bytes
ZIP_RATIO_FLOOR = 16 << 20
MAX_WEIGHTS_ZIP_BYTES = 2 << 30  # a PyTorch archive's tensors
TRUST_HINT = ("export the network to ONNX (torch.onnx.export) and import that file; or, only if you trust where "
              "it comes from, allow model files that contain code (--trust-code, or the checkbox under Open... in "
              "the app): segstudio then converts it to ONNX in a confined process")


class ModelRefusedError(IncompatibleArtifactError):
    """A model file that is unsafe to load (code in a pickle or archive, a zip that writes outside its folder)."""


def _zip_infolist(path: Path) -> list[zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as e:
        raise IncompatibleArtifactError(f"{path.name}: not a readable zip archive ({e})") from None


def zip_members(path: Path, *, max_bytes: int = MAX_ZIP_BYTES,
                infos: list[zipfile.ZipInfo] | None = None) -> list[zipfile.ZipInfo]:
    """The entries of a zip, refused (with the numbers) when they are too many, too big or too compressed.

    Read from the central directory only: nothing is decompressed, so the
    sizes checked are the ones the entries declare (:func:`safe_extract`
    then holds each entry to its declared size).

    Parameters
    ----------
    path : pathlib.Path
        The zip file (its name is used in the messages).
    max_bytes : int
        The most that all entries together may declare once extracted, in
        bytes (default :data:`MAX_ZIP_BYTES`, 1 GiB).
    infos : list of zipfile.ZipInfo, optional
        The entries, already read from ``path``; read from it when None.

    Returns
    -------
    list of zipfile.ZipInfo
        The entries, as read (or as given).

    Raises
    ------
    ModelRefusedError
        More than :data:`MAX_ZIP_ENTRIES` (10,000) entries; more than
        ``max_bytes`` declared in total; or an entry that declares more than
        :data:`ZIP_RATIO_FLOOR` (16 MiB) and more than :data:`MAX_ZIP_RATIO`
        (200) times its compressed size.
    IncompatibleArtifactError
        ``path`` is not a readable zip (only when ``infos`` is None).
    """
    infos = _zip_infolist(path) if infos is None else infos
    if len(infos) > MAX_ZIP_ENTRIES:
        raise ModelRefusedError(f"refused {path.name}: {len(infos)} entries (segstudio opens at most "
                                f"{MAX_ZIP_ENTRIES})")
    total = sum(i.file_size for i in infos)
    packed = sum(i.compress_size for i in infos)
    if total > max_bytes:
        raise ModelRefusedError(
            f"refused {path.name}: it would extract to {total / (1 << 30):.2f} GiB ({total} bytes from "
            f"{packed} compressed; segstudio extracts at most {max_bytes / (1 << 30):.0f} GiB)")
    for i in infos:
        if i.file_size > ZIP_RATIO_FLOOR and i.file_size > MAX_ZIP_RATIO * max(i.compress_size, 1):
            raise ModelRefusedError(
                f"refused {path.name}: its entry {i.filename!r} is compressed {i.file_size / max(i.compress_size, 1):.0f}:1 "
                f"({i.file_size} bytes from {i.compress_size}; segstudio accepts at most {MAX_ZIP_RATIO}:1)")
    return infos


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, sink, zip_name: str) -> None:
    """Copy one entry to ``sink`` (a writable file, or None to discard), never past its declared size."""
    left = info.file_size
    with z.open(info) as src:
        while True:
            chunk = src.read(min(1 << 20, left + 1))
            if not chunk:
                break
            left -= len(chunk)
            if left < 0:
                raise ModelRefusedError(f"refused {zip_name}: its entry {info.filename!r} holds more than the "
                                        f"{info.file_size} bytes it declares")
            if sink is not None:
                sink.write(chunk)


def safe_extract(zip_path: Path, target: Path) -> None:
    """Extract ``zip_path`` into ``target``, refusing zips that are too big (:func:`zip_members`),
    members that would land outside it (or are links), and entries that yield more than they declare.

    Parameters
    ----------
    zip_path : pathlib.Path
        The zip; checked with :func:`zip_members` at its default limit (1 GiB
        in all) before anything is written.
    target : pathlib.Path
        The folder to extract into (it and the entries' folders are created
        as needed).

    Raises
    ------
    ModelRefusedError
        The zip's limits (:func:`zip_members`); an entry whose name starts
        with ``/``, a backslash or a drive letter, resolves outside
        ``target``, or is a symbolic link (all checked before anything is
        written, so the whole zip is refused); an entry that yields more
        bytes than it declares (extraction stops there, what was written
        stays).
    InputError
        ``target`` cannot be written (an operating-system error).
    IncompatibleArtifactError
        A damaged zip, or an entry it cannot decompress (encrypted, unknown
        compression).
    """
    target = target.resolve()
    infos = zip_members(zip_path)
    for info in infos:
        name = info.filename
        dest = (target / name).resolve()
        mode = info.external_attr >> 16
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or (
            dest != target and target not in dest.parents
        ):
            raise ModelRefusedError(
                f"refused {zip_path.name}: its entry {name!r} would be written outside the model folder",
                hint="the archive is damaged or malicious; get the model from its author again",
            )
        if stat.S_ISLNK(mode):
            raise ModelRefusedError(f"refused {zip_path.name}: its entry {name!r} is a symbolic link")
    try:
        with zipfile.ZipFile(zip_path) as z:
            for info in infos:
                dest = target / info.filename
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "wb") as f:
                    _read_member(z, info, f, zip_path.name)
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, NotImplementedError) as e:
        if isinstance(e, OSError) and e.errno is not None and not isinstance(e, zipfile.BadZipFile):
            raise InputError(f"cannot extract {zip_path.name} to a temporary folder ({e.strerror})") from None
        raise IncompatibleArtifactError(f"{zip_path.name}: a damaged zip archive ({e})") from None


# ------------------------------------------------------------------ what a file is


PICKLE_SCAN_BYTES = 64 << 20


def is_torchscript_archive(path: Path, infos: list[zipfile.ZipInfo] | None = None) -> bool:
    """Whether a zip is a TorchScript archive, from its records alone (nothing of it is run or unpickled).

    TorchScript archives hold a ``code/`` folder (their program), and
    ``constants.pkl`` / ``*.debug_pkl`` records; their pickles name
    ``__torch__`` classes.  Any of these marks one, whatever the file is
    called and whichever records were removed.

    Parameters
    ----------
    path : pathlib.Path
        The zip file.
    infos : list of zipfile.ZipInfo, optional
        Its entries, already checked; when None they are read and checked
        with :func:`zip_members` at the weights' limit
        (:data:`MAX_WEIGHTS_ZIP_BYTES`, 2 GiB).

    Returns
    -------
    bool
        True when an entry sits in a ``code`` folder or is named
        ``constants.pkl``, ``model.json`` or ``*.debug_pkl``, or when a
        ``.pkl`` entry of at most :data:`PICKLE_SCAN_BYTES` (64 MiB) contains
        the bytes ``__torch__`` (larger pickles are not scanned).

    Raises
    ------
    ModelRefusedError
        The zip's limits (when ``infos`` is None), or a scanned pickle that
        yields more than it declares.
    IncompatibleArtifactError
        A damaged zip.
    """
    infos = zip_members(path, max_bytes=MAX_WEIGHTS_ZIP_BYTES) if infos is None else infos
    for info in infos:
        parts = info.filename.replace("\\", "/").split("/")
        if "code" in parts[:-1] or parts[-1] in ("constants.pkl", "model.json") or parts[-1].endswith(".debug_pkl"):
            return True
    try:
        with zipfile.ZipFile(path) as z:
            for info in infos:
                if info.filename.endswith(".pkl") and info.file_size <= PICKLE_SCAN_BYTES:
                    data = io.BytesIO()
                    _read_member(z, info, data, path.name)
                    if b"__torch__" in data.getbuffer():
                        return True
    except (zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError) as e:
        raise IncompatibleArtifactError(f"{path.name}: a damaged zip archive ({e})") from None
    return False


def refuse_code(path: Path, what: str = "a TorchScript archive") -> ModelRefusedError:
    """The error refusing a model file that holds code (the caller raises it).

    Parameters
    ----------
    path : pathlib.Path
        The refused file (its name is in the message).
    what : str
        What the file is, completing "it is ...".

    Returns
    -------
    ModelRefusedError
        With :data:`TRUST_HINT` as its hint (export to ONNX, or allow code
        with ``--trust-code``).
    """
    return ModelRefusedError(f"refused {path.name}: it is {what}, which holds code that runs when it is loaded",
                             hint=TRUST_HINT)
