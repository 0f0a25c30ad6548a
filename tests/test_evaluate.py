"""Metrics against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from segstudio.core.tasks.evaluate import mean_scores, overlaps, score


def _box(lab, i, y0, y1, x0, x1):
    lab[y0:y1, x0:x1] = i


def test_perfect_match():
    t = np.zeros((20, 20), int)
    _box(t, 1, 0, 5, 0, 5)
    _box(t, 2, 10, 15, 10, 15)
    p = np.where(t == 1, 9, np.where(t == 2, 4, 0))  # other ids
    s = score(t, p)
    assert s.ap[0.5] == 1 and s.ap[0.9] == 1 and s.f1[0.5] == 1 and s.dice == 1 and s.pq == pytest.approx(1)


def test_hand_computed_tp_fp_fn():
    t = np.zeros((30, 30), int)
    _box(t, 1, 0, 10, 0, 10)  # 100 px
    _box(t, 2, 20, 30, 20, 30)  # 100 px, missed
    p = np.zeros_like(t)
    _box(p, 1, 0, 10, 0, 8)  # 80 px inside true 1: IoU 0.8
    _box(p, 2, 12, 16, 0, 4)  # false positive
    s = score(t, p, thresholds=(0.5, 0.85))
    # at 0.5: TP 1, FP 1, FN 1
    assert s.ap[0.5] == pytest.approx(1 / 3)
    assert s.f1[0.5] == pytest.approx(2 / 4)
    assert s.precision[0.5] == pytest.approx(0.5) and s.recall[0.5] == pytest.approx(0.5)
    # at 0.85 the 0.8 match is gone: TP 0
    assert s.ap[0.85] == 0
    assert s.pq == pytest.approx(0.8 / (1 + 0.5 + 0.5))
    assert s.dice == pytest.approx(2 * 80 / (200 + 96))


def test_one_to_one_split_object():
    """A true object split into two halves: at most one half may match."""
    t = np.zeros((10, 20), int)
    _box(t, 1, 0, 10, 0, 20)  # 200 px
    p = np.zeros_like(t)
    _box(p, 1, 0, 10, 0, 12)  # IoU 0.6
    _box(p, 2, 0, 10, 12, 20)  # IoU 0.4
    s = score(t, p)
    assert s.ap[0.5] == pytest.approx(1 / 2)  # TP 1, FP 1


def test_matching_below_half_is_one_to_one():
    """At IoU 0.3 both halves overlap enough, but only one may match (maximum matching)."""
    t = np.zeros((10, 20), int)
    _box(t, 1, 0, 10, 0, 20)
    p = np.zeros_like(t)
    _box(p, 1, 0, 10, 0, 11)  # IoU 0.55
    _box(p, 2, 0, 10, 11, 20)  # IoU 0.45
    s = score(t, p, thresholds=(0.3,))
    assert s.ap[0.3] == pytest.approx(1 / 2)


def test_maximum_matching_prefers_more_matches():
    """Greedy by IoU would take (A, x) and strand B and y; the maximum matching takes (A, y) and (B, x)."""
    gt = np.array([[1] * 10 + [2] * 10])
    pred = np.zeros_like(gt)
    pred[0, 0:3] = 2  # y: inside A, IoU 3/10
    pred[0, 4:16] = 1  # x: IoU 6/16 with A and with B
    ov = overlaps(gt, pred)
    ious = {(int(g), int(p)): round(float(v), 4) for g, p, v in zip(ov.gt_ids, ov.pred_ids, ov.iou)}
    assert ious == {(1, 1): 0.375, (2, 1): 0.375, (1, 2): 0.3}
    assert score(gt, pred, thresholds=(0.3,)).ap[0.3] == 1  # TP 2, FP 0, FN 0
    assert score(gt, pred).ap[0.5] == 0


def test_empty_images():
    z = np.zeros((5, 5), int)
    s = score(z, z)
    assert s.ap[0.5] == 1 and s.dice == 1
    one = z.copy()
    one[1:3, 1:3] = 1
    assert score(z, one).ap[0.5] == 0 and score(one, z).ap[0.5] == 0


def test_mean_scores():
    t = np.zeros((10, 10), int)
    _box(t, 1, 0, 4, 0, 4)
    rows = [score(t, t).as_dict(), score(t, np.zeros_like(t)).as_dict()]
    m = mean_scores(rows)
    assert m["ap50"] == pytest.approx(0.5) and m["count_error"] == pytest.approx(0.5)


# ------------------------------------------------------------------ evaluation inputs


def _pair_folder(folder, labels_shape=None, index=None):
    """A folder with one image / labels pair (the bundled sample), labels of ``labels_shape`` when given."""
    import tifffile
    from segstudio.sample_data import sample_pairs

    from segstudio.core.image.sources import read_image

    img, lab = sample_pairs()[0]
    folder.mkdir()
    image = read_image(img).data.reshape(read_image(img).plane_shape)
    tifffile.imwrite(folder / "x_img.tif", image)
    truth = read_image(lab).data.reshape(image.shape)
    tifffile.imwrite(folder / "x_labels.tif", truth if labels_shape is None else np.zeros(labels_shape, np.uint16))
    if index is not None:
        (folder / "index.json").write_text(index)
    return folder


def test_labels_of_another_shape_is_an_input_error_naming_both_files(tmp_path):
    from segstudio.core.backends import create_backend
    from segstudio.core.errors import InputError
    from segstudio.core.jobs import run_sync
    from segstudio.core.models.catalog import get_model
    from segstudio.core.tasks.evaluate import evaluate_job
    from segstudio.core.training.datasets import find_pairs

    folder = _pair_folder(tmp_path / "d", labels_shape=(100, 80))
    pairs = find_pairs(folder, folder)
    model = get_model("nuclei-light")
    calls = []

    class Counting:  # the network must not run for a pair that cannot be scored
        def __init__(self, backend):
            self.backend, self.device, self.precision = backend, "cpu", "fp32"

        def predict(self, batch, crop=None):
            calls.append(batch.shape)
            return self.backend.predict(batch, crop)

        def describe(self):
            return self.backend.describe()

    with create_backend("onnxruntime", model) as b, pytest.raises(InputError) as e:
        run_sync(evaluate_job(pairs, model, Counting(b)))
    text = str(e.value)
    assert str(folder / "x_labels.tif") in text and str(folder / "x_img.tif") in text
    assert "100x80" in text and not calls


@pytest.mark.parametrize("content,says", [
    ('[{"file": "y", "kind": ', "not a readable JSON file"),
    ('{"file": 3}', "expected a list of entries, found a JSON dict"),
    ('[{"file": 3, "kind": "fluorescence"}]', "entry 0 is not an object"),
    ('[{"file": "d/x", "kind": "fluorescence"}, {"file": "d/z"}]', "entry 1 is not an object"),
    ('["d/x"]', "entry 0 is not an object"),
    (b"\xff\xfe\x00[", "not a readable JSON file"),
])
def test_broken_index_json_is_an_input_error_naming_it(tmp_path, content, says):
    from segstudio.core.errors import InputError
    from segstudio.core.training.datasets import find_images, find_pairs

    folder = _pair_folder(tmp_path / "d")
    index = folder / "index.json"
    index.write_bytes(content if isinstance(content, bytes) else content.encode())
    for call in (lambda: find_pairs(folder, folder, kind="fluorescence"), lambda: find_images(folder, kind="fluorescence")):
        with pytest.raises(InputError) as e:
            call()
        assert str(index) in str(e.value) and says in str(e.value)


def test_valid_index_json_still_filters_by_kind(tmp_path):
    from segstudio.core.training.datasets import find_pairs

    folder = _pair_folder(tmp_path / "d", index='[{"file": "d/x", "kind": "fluorescence"}]')
    assert [p.name for p in find_pairs(folder, folder, kind="fluorescence")] == ["x"]


def test_size_counts_bins_objects_by_diameter():
    from segstudio.core.tasks.evaluate import SIZE_BINS, size_counts, size_table

    t = np.zeros((100, 100), int)
    _box(t, 1, 0, 10, 0, 10)  # 100 px: diameter 11.3 -> bin 8-12, found
    _box(t, 2, 20, 26, 20, 26)  # 36 px: 6.8 -> bin 0-8, missed
    _box(t, 3, 40, 70, 40, 70)  # 900 px: 33.9 -> bin 32-48, found
    p = np.zeros_like(t)
    _box(p, 5, 0, 10, 0, 9)
    _box(p, 6, 40, 70, 40, 68)
    _box(p, 7, 80, 100, 80, 100)  # false positive, 400 px: 22.6 -> bin 16-24
    c = size_counts(t, p)
    assert c.shape == (len(SIZE_BINS) - 1, 3)
    assert c[0].tolist() == [0, 0, 1] and c[1].tolist() == [1, 0, 0]
    assert c[3].tolist() == [0, 1, 0] and c[5].tolist() == [1, 0, 0] and c.sum() == 4
    rows = {r["diameter_px"]: r for r in size_table(c)}
    assert set(rows) == {"0-8", "8-12", "16-24", "32-48"}
    assert rows["8-12"]["ap50"] == 1 and rows["0-8"]["recall"] == 0 and rows["16-24"]["n_true"] == 0
