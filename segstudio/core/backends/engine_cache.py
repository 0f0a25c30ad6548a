"""The TensorRT engine cache: what an engine was built for, and refusing foreign ones.

A serialized TensorRT engine runs only on the GPU model and TensorRT version
it was built with, for the shapes of its optimization profile.  Engines are
stored as ``<digest>.engine`` with a JSON sidecar holding the
:class:`EngineKey`; the digest names the file, and the sidecar is compared
field by field before an engine is used, so an engine copied from another
machine is refused with a message saying what differs and to rebuild it.

Pure Python (no TensorRT needed), so the logic is tested everywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import IncompatibleArtifactError
from ..image.io import atomic_path

Shape = tuple[int, int, int, int]


@dataclass(frozen=True)
class Profile:
    """Min / opt / max input shapes ``(B, C, H, W)`` of an optimization profile."""

    min: Shape
    opt: Shape
    max: Shape

    def covers(self, shape: tuple[int, ...]) -> bool:
        return all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))


def default_profile(channels: int, multiple: int, tile_shape: tuple[int, int], batch_size: int, *,
                    min_side: int = 0) -> Profile:
    """Profile for a tiling plan: any tile from ``min_side`` (default: one stride) up to ``tile_shape``,
    batches up to ``batch_size``."""
    h, w = tile_shape
    low = max(multiple, -(-min_side // multiple) * multiple) if min_side else multiple
    low_h, low_w = min(low, h), min(low, w)
    return Profile(
        min=(1, channels, low_h, low_w),
        opt=(batch_size, channels, h, w),
        max=(batch_size, channels, h, w),
    )


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on."""

    model_sha256: str
    precision: str
    profile: Profile
    gpu: str
    compute_capability: str
    tensorrt: str

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]

    def to_json(self) -> dict:
        d = asdict(self)
        d["profile"] = {k: list(v) for k, v in d["profile"].items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "EngineKey":
        d = dict(d)
        d["profile"] = Profile(**{k: tuple(v) for k, v in d["profile"].items()})
        return cls(**d)


def explain_mismatch(built: EngineKey, here: EngineKey) -> str:
    """Which of the engine's conditions do not hold here, in words."""
    labels = {
        "gpu": "GPU", "compute_capability": "compute capability", "tensorrt": "TensorRT",
        "model_sha256": "model", "precision": "precision", "profile": "shape profile",
    }
    diffs = []
    for field, label in labels.items():
        a, b = getattr(built, field), getattr(here, field)
        if a != b:
            if field == "model_sha256":
                a, b = a[:12], b[:12]
            diffs.append(f"{label} {a} (here: {b})")
    return "; ".join(diffs)


class EngineCache:
    """A folder of engines keyed by :class:`EngineKey`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path_for(self, key: EngineKey) -> Path:
        return self.root / f"{key.digest()}.engine"

    def load(self, key: EngineKey) -> bytes | None:
        """The cached engine for ``key``, or None; refuses a file whose sidecar disagrees."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        return check_engine_file(path, key)

    def store(self, key: EngineKey, engine: bytes, provenance: dict | None = None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path_for(key)
        with atomic_path(path) as tmp:
            tmp.write_bytes(engine)
        with atomic_path(sidecar(path)) as tmp:
            tmp.write_text(json.dumps({"key": key.to_json(), "provenance": provenance or {}}, indent=1))
        return path


def sidecar(engine: Path) -> Path:
    return engine.with_suffix(engine.suffix + ".json")


def check_engine_file(path: str | Path, here: EngineKey) -> bytes:
    """Read an engine file after checking its sidecar against this machine and model."""
    path = Path(path)
    side = sidecar(path)
    if not side.is_file():
        raise IncompatibleArtifactError(
            f"{path.name} has no description of what it was built for",
            hint="rebuild the engine on this machine (segstudio builds and caches it on first use)",
        )
    try:
        built = EngineKey.from_json(json.loads(side.read_text())["key"])
    except (KeyError, TypeError, ValueError) as e:
        raise IncompatibleArtifactError(f"{side.name} is not a valid engine description ({e})") from None
    if built != here:
        raise IncompatibleArtifactError(
            f"the TensorRT engine {path.name} was built for {explain_mismatch(built, here)}",
            hint="an engine only runs where it was built: rebuild it on this machine",
        )
    return path.read_bytes()
