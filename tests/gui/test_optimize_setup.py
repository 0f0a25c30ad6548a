"""The optimization wizard's set-up pages (1 to 4) and its docks, on the bundled samples (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
from qtpy.QtWidgets import QCheckBox, QComboBox, QDockWidget, QSpinBox

from segstudio.app.main_window import build_window, optimize_widget
from segstudio.core.optimize.options import OptionSpec
from segstudio.core.optimize.steps import STEP_SPECS, QuantizeStep, format_steps, parse_steps
from segstudio.napari_plugin._optimize import OptimizeWidget
from segstudio.napari_plugin._sample_data import load_sample, sample_id
from segstudio.sample_data import sample_pairs

pytestmark = pytest.mark.gui

SAMPLES = Path(sample_pairs()[0][0]).parent
WAIT_MS = 60_000


def idle(page) -> bool:
    return not page.runner.is_running() and not getattr(page, "_queue", None)


@pytest.fixture
def widget(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    for data, kwargs, layer_type in load_sample(sample_id(sample_pairs()[1][0])):
        getattr(viewer, f"add_{layer_type}")(data, **kwargs)
    w = OptimizeWidget(viewer)
    qtbot.addWidget(w)
    yield w
    w.wizard.shutdown()


def to_page_2(wizard, qtbot):
    page = wizard.model_page
    page.select("nuclei-light")
    qtbot.waitUntil(lambda: page.info is not None, timeout=WAIT_MS)
    assert wizard.next() and wizard.index == 1
    assert wizard.header.text() == "Step 2 of 6: Calibration images"


def test_pages_validate_and_an_int8_recipe_needs_calibration(widget, qtbot):
    wizard = widget.wizard
    assert wizard.header.text() == "Step 1 of 6: Model and target"
    model_page = wizard.model_page
    model_page.select("nuclei-light")
    if model_page.info is None:  # the backends are still being probed: Next says so
        assert not wizard.next() and "backends" in wizard.reason.text()
    qtbot.waitUntil(lambda: model_page.info is not None, timeout=WAIT_MS)
    assert model_page.info.variants["cpu"]  # something runs it here
    if model_page.info.gpu_reason is not None:
        assert not model_page.gpu_radio.isEnabled() and model_page.gpu_reason.text().startswith("GPU: ")
    assert wizard.next() and wizard.state.model.name == "nuclei-light"
    assert wizard.state.out_dir.name.startswith("nuclei-light-")

    # page 2 without calibration images: allowed here (not every recipe needs them)
    assert wizard.next() and wizard.index == 2 and wizard.state.calib is None

    val = wizard.validation_page
    assert not wizard.next() and "calibration images" in wizard.reason.text()  # the default source is empty
    val.set_source("pairs", SAMPLES)
    qtbot.waitUntil(lambda: idle(val) and val.vset is not None, timeout=WAIT_MS)
    assert len(val.vset.images) == len(sample_pairs()) and val.vset.has_labels
    assert wizard.next() and wizard.state.labelled and wizard.state.max_drop == 0.01
    assert wizard.state.min_speedup == 1.05

    recipe = wizard.recipe_page
    assert recipe.preset_key == "int8" and recipe.recipe_text() == "quantize:int8"
    qtbot.waitUntil(lambda: recipe.check_for("quantize:int8") is not None, timeout=WAIT_MS)
    assert not wizard.next() and wizard.index == 3
    assert "Step 1 (quantize:int8) cannot run here" in wizard.reason.text()
    assert "calibration" in wizard.reason.text()
    assert recipe.problems_label.isVisible() or recipe.problems_label.text()

    wizard.back()
    wizard.back()
    assert wizard.index == 1
    calib = wizard.calibration_page
    calib.set_folder(SAMPLES)
    qtbot.waitUntil(lambda: idle(calib) and calib.build is not None, timeout=WAIT_MS)
    tiles = calib.build.source.tiles()
    assert calib.thumbnail_count() == len(tiles) == len(calib.build.source.chosen_tiles()) > 0
    assert calib.warnings() == []  # four files of different densities and intensities
    assert calib.status.text().startswith(f"{len(tiles)} tiles of 256 px")
    assert wizard.next() and wizard.state.calib is calib.build.source
    assert wizard.next() and wizard.index == 3
    qtbot.waitUntil(lambda: recipe.check_for("quantize:int8") is not None, timeout=WAIT_MS)
    assert recipe.check_for("quantize:int8").problems == []
    assert wizard.next()
    assert [s.label for s in wizard.state.steps] == ["quantize:int8"] and wizard.state.preset_key == "int8"
    if wizard.run_page is not None:
        assert wizard.index == 4 and wizard.header.text() == "Step 5 of 6: Run"


def test_one_file_calibration_warns_and_thumbnails_match_the_tiles(widget, qtbot):
    wizard = widget.wizard
    to_page_2(wizard, qtbot)
    calib = wizard.calibration_page
    calib.set_files([sample_pairs()[0][0]])
    qtbot.waitUntil(lambda: idle(calib) and calib.build is not None, timeout=WAIT_MS)
    n = len(calib.build.source.tiles())
    assert calib.thumbnail_count() == n
    warnings = calib.warnings()
    assert any("one file" in w for w in warnings)
    assert any(w.startswith("Small set:") for w in warnings) == (n < 16)
    assert calib.warnings_label.text().count("Warning:") == len(warnings)

    calib.use_layers()  # the open image layer (one) is a one-file set too
    qtbot.waitUntil(lambda: idle(calib) and calib.build is not None and calib.source_kind == "layers"
                    and calib._built_for == calib._key(calib.source_spec()), timeout=WAIT_MS)
    assert any("one file" in w for w in calib.warnings())


def test_advanced_view_is_made_from_the_specs_and_refuses_a_bad_value(widget, qtbot, monkeypatch):
    wizard = widget.wizard
    to_page_2(wizard, qtbot)
    wizard._show(3)
    recipe = wizard.recipe_page
    recipe.choose("prune-recover-int8")
    recipe.advanced_button.setChecked(True)
    editor = recipe.editor
    assert [b.spec.name for b in editor.boxes] == ["prune", "recover", "quantize"]
    prune = editor.box(0)
    # one field per option of the spec, of the widget its kind calls for
    assert [f.spec.name for f in prune.fields] == [prune.spec.argument.name] + [o.name for o in prune.spec.options]
    for f in prune.fields:
        assert f.widget.toolTip().startswith(f.spec.help)
        if f.spec.kind is bool:
            assert isinstance(f.widget, QCheckBox)
        elif f.spec.choices:
            assert isinstance(f.widget, QComboBox) and tuple(
                f.widget.itemText(i) for i in range(f.widget.count())) == f.spec.choices

    ratio = prune.field("ratio")
    ratio.set_raw(1.0)  # the ratio is strictly between 0 and 1
    assert editor.problems() and ratio.spec.allowed() in editor.problems()[0]
    assert prune.errors["ratio"].isVisible() or prune.errors["ratio"].text()
    assert ratio.spec.allowed() in prune.errors["ratio"].text()
    assert not wizard.next_button.isEnabled() and not wizard.next()
    assert ratio.spec.allowed() in wizard.reason.text()
    ratio.set_raw(0.3)
    assert editor.problems() == [] and wizard.next_button.isEnabled()
    assert recipe.recipe_text() == format_steps(parse_steps("prune:0.3,recover:steps=2500,quantize:int8"))
    assert recipe.preset_key is None and recipe.custom_radio.isChecked()

    editor.add_step("export")
    assert [b.spec.name for b in editor.boxes][-1] == "export"
    editor.boxes[-1].remove_button.click()
    assert [b.spec.name for b in editor.boxes] == ["prune", "recover", "quantize"]

    # an option added in core appears in the Advanced view with no GUI change
    knob = OptionSpec("knob", int, 3, "a new option", low=1, high=5)
    mode = OptionSpec("flavour", str, "plain", "another one", choices=("plain", "spicy"))
    monkeypatch.setattr(QuantizeStep, "option_specs", (*QuantizeStep.option_specs, knob, mode))
    monkeypatch.setitem(STEP_SPECS, "quantize", QuantizeStep.step_spec())
    editor.set_steps(parse_steps("quantize:int8"))
    box = editor.box(0)
    field = box.field("knob")
    assert isinstance(field.widget, QSpinBox) and (field.widget.minimum(), field.widget.maximum()) == (1, 5)
    assert field.widget.toolTip().startswith("a new option")
    box.field("knob").set_raw(4)
    box.field("flavour").set_raw("spicy")
    (step,) = editor.steps()
    assert step.opts["knob"] == 4 and step.opts["flavour"] == "spicy"
    assert recipe.recipe_text() == "quantize:int8:knob=4:flavour=spicy"


def test_the_dock_is_in_the_standalone_window_and_in_the_plugin(make_napari_viewer):
    from npe2 import PluginManager

    viewer = build_window(viewer=make_napari_viewer(), show=False)
    widget = optimize_widget(viewer)
    window = viewer.window._qt_window
    docks = [d for d in window.findChildren(QDockWidget) if d.isAncestorOf(widget)]
    assert len(docks) == 1 and docks[0].windowTitle() == "Optimize"
    assert widget.wizard.header.text() == "Step 1 of 6: Model and target"
    widget.wizard.shutdown()

    pm = PluginManager.instance()
    pm.discover()
    names = [w.display_name for w in pm.get_manifest("segstudio").contributions.widgets]
    assert "Optimize" in names


def test_a_kept_model_reaches_the_segment_and_batch_lists_and_survives_a_restart(make_napari_viewer, qtbot,
                                                                               segstudio_home):
    from segstudio.app.main_window import batch_widget, segment_widget
    from segstudio.core.models.catalog import get_model

    viewer = build_window(viewer=make_napari_viewer(), show=False)
    wizard = optimize_widget(viewer).wizard
    import shutil

    from segstudio.core.models.catalog import write_card

    builtin = get_model("nuclei-light")
    final = segstudio_home.parent / "run" / "final"  # an optimize result: a card in its run's folder
    final.mkdir(parents=True)
    files = {fmt: Path(shutil.copy2(path, final / path.name)) for fmt, path in builtin.files.items()}
    source = get_model(write_card(builtin.spec, files, final / "nuclei-light.json", provenance={"step": "quantize"}))
    added = []
    wizard.model_added.connect(added.append)
    wizard.use_model(source)  # what the result page's "Use this model" does
    qtbot.waitUntil(lambda: bool(added), timeout=WAIT_MS)
    kept = added[0]
    assert kept.card_path.is_relative_to(segstudio_home)
    assert segment_widget(viewer).panel.model_name == str(kept.card_path)
    batch = batch_widget(viewer).panel
    assert batch.model_combo.findData(kept.name) >= 0
    wizard.shutdown()
    # after a restart: a new window lists it
    viewer2 = build_window(viewer=make_napari_viewer(), show=False)
    assert batch_widget(viewer2).panel.model_combo.findData(kept.name) >= 0
    optimize_widget(viewer2).wizard.model_page.select(kept.name)
    optimize_widget(viewer2).wizard.shutdown()
