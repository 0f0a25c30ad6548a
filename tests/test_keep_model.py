"""keep_model: an optimize result (or any model card) kept as a user model, with its lineage."""

from __future__ import annotations

import json
import shutil

import pytest

from segstudio.core.models.catalog import get_model, load_card, model_digest, write_card
from segstudio.core.models.user import keep_model, user_models, user_models_dir


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGSTUDIO_HOME", str(tmp_path / "home"))


def fake_result(tmp_path, name="nuclei-light"):
    """An optimize output folder: final/<card> beside report.json."""
    src = get_model(name)
    out = tmp_path / "run"
    final = out / "final"
    final.mkdir(parents=True)
    files = {}
    for fmt, path in src.files.items():
        shutil.copy2(path, final / path.name)
        files[fmt] = final / path.name
    card = write_card(src.spec, files, final / f"{src.name}.json", provenance={"step": "quantize", "parent": "abc"})
    rows = [{"index": 0, "name": "quantize:int8", "status": "kept", "reason": "within budget", "ap50": 0.8,
             "speedup_vs_baseline": 3.1, "details": {"big": [1] * 10}}]
    (out / "report.json").write_text(json.dumps({"model": src.name, "steps": rows}))
    return card, src


def test_kept_result_is_a_user_model_with_its_card_and_lineage(tmp_path):
    card, src = fake_result(tmp_path)
    kept = keep_model(card)
    # the built-in model holds the name: the kept one gets the next, so that its name finds it
    name = f"{src.name}-2"
    assert kept.name == name and kept.card_path == user_models_dir() / name / f"{name}.json"
    assert model_digest(kept) == model_digest(src)
    assert kept.provenance["step"] == "quantize" and kept.provenance["kept_from"] == str(card)
    assert kept.provenance["lineage"] == [{"index": 0, "name": "quantize:int8", "status": "kept",
                                           "reason": "within budget", "ap50": 0.8, "speedup_vs_baseline": 3.1}]
    # after a restart: listed, and found by name (what the Batch panel asks for)
    assert [m.card_path for m in user_models()] == [kept.card_path]
    assert get_model(name).card_path == kept.card_path
    # the run's folder can go: the kept copy stands alone
    shutil.rmtree(tmp_path / "run")
    assert load_card(kept.card_path).files.keys() == src.files.keys()


def test_keeping_twice_copies_once_and_another_model_of_that_name_gets_a_suffix(tmp_path):
    card, src = fake_result(tmp_path)
    first = keep_model(card, name="mine")
    assert first.name == "mine"
    assert keep_model(card, name="mine").card_path == first.card_path
    assert keep_model(first.card_path).card_path == first.card_path  # a user model already
    other = get_model("nuclei")
    other_card, _ = fake_result(tmp_path / "b", "nuclei")
    second = keep_model(other_card, name="mine")  # another model under a name already kept
    assert second.name == "mine-2" and second.card_path.parent.name == "mine-2"
    assert model_digest(second) == model_digest(other)
    assert get_model("mine-2").card_path == second.card_path


def test_builtin_models_are_not_copied():
    model = get_model("nuclei")
    assert keep_model(model.card_path).card_path == model.card_path
    assert user_models() == []
