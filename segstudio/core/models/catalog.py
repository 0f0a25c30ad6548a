"""Finding a model: the built-ins, the user's imported models, a card or a model file by path.

Built-in cards live in ``segstudio/core/models/builtin/`` and ship with the
package; nothing is downloaded.  The card format is :mod:`.card` (re-exported
here, where most code has always imported it from).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .card import (  # noqa: F401 - re-exported
    BUILTIN_DIR,
    Model,
    _is_card,
    load_card,
    model_digest,
    write_card,
)

DEFAULT_MODEL = "nuclei"


def builtin_models() -> list[Model]:
    """All models shipped with segstudio: the default (``nuclei``) first, then by name.

    Returns
    -------
    list of Model
        One per card in the built-in folder, loaded without verifying
        checksums (``verify=False``).
    """
    cards = sorted(BUILTIN_DIR.glob("*.json"), key=lambda p: (p.stem != DEFAULT_MODEL, p.stem))
    return [load_card(p, verify=False) for p in cards]


def get_model(name_or_path: str | Path, *, trust_code: bool = False) -> Model:
    """A built-in or imported model by name, a model card by path, a folder holding one card, or a model file.

    A model file (ONNX, TorchScript, state dict) or BioImage.IO package is
    imported once (:func:`segstudio.core.models.user.import_cached`) and
    reused while its contents do not change.  TorchScript (code) is refused
    unless ``trust_code`` (then converted to ONNX in a confined process).

    Parameters
    ----------
    name_or_path : str or pathlib.Path
        Tried in this order: a ``.json`` card file; a folder holding exactly
        one card; a model file, or a BioImage.IO package (zip, or folder with
        ``rdf.yaml`` / ``bioimageio.yaml``); a built-in model's name; an
        imported model's name (``<user models>/<name>/<name>.json``).
    trust_code : bool
        For a model file or package only: convert TorchScript instead of
        refusing it.

    Returns
    -------
    Model
        Loaded with :func:`load_card` (checksums verified).

    Raises
    ------
    InputError
        An unknown name, or a folder holding several cards.
    ModelRefusedError
        A TorchScript file or package without ``trust_code``, or another
        refusal of :func:`segstudio.core.models.user.import_model`.
    IncompatibleArtifactError
        A card that does not load, or a model file that does not import.
    """
    candidate = Path(name_or_path)
    if candidate.suffix == ".json" and candidate.is_file():
        return load_card(candidate)
    if candidate.is_dir() and any(_is_card(p) for p in candidate.glob("*.json")):
        cards = [p for p in sorted(candidate.glob("*.json")) if _is_card(p)]
        if len(cards) == 1:
            return load_card(cards[0])
        raise InputError(f"{candidate} holds {len(cards)} model cards", hint="give the path of one card (.json)")
    from .user import RDF_NAMES, import_cached, user_models_dir

    if candidate.is_file() or (candidate.is_dir() and any((candidate / n).is_file() for n in RDF_NAMES)):
        return import_cached(candidate, trust_code=trust_code)
    card = BUILTIN_DIR / f"{name_or_path}.json"
    if card.is_file():
        return load_card(card)
    user = user_models_dir() / str(name_or_path) / f"{name_or_path}.json"
    if user.is_file():
        return load_card(user)
    names = [p.stem for p in sorted(BUILTIN_DIR.glob("*.json"))]
    raise InputError(
        f"unknown model {str(name_or_path)!r}",
        hint=f"built-in models: {', '.join(names) or 'none installed'}; imported models: `segstudio models`; "
        "or give the path of a model card (.json), an ONNX / TorchScript / state-dict file or a BioImage.IO package",
    )
