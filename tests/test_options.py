"""Typed segmentation options: one Diameter value instead of a float, "native" and a separate micrometre argument."""

import pytest

from segstudio.core.errors import InputError
from segstudio.core.segment.options import Diameter, SegmentOptions


@pytest.mark.parametrize("text, expected", [
    ("auto", Diameter()), ("native", Diameter("native")), (" 24 ", Diameter("px", 24.0)),
    ("24px", Diameter("px", 24.0)), ("9um", Diameter("um", 9.0)), ("9 µm", Diameter("um", 9.0)),
])
def test_diameter_parses_every_form_the_command_line_takes(text, expected):
    assert Diameter.parse(text) == expected
    assert Diameter.parse(str(expected)) == expected  # printed as it is parsed


@pytest.mark.parametrize("bad", ["", "big", "0", "-3", "nan", "inf", "20000", "0.001um", "1e9um"])
def test_diameter_refuses_what_is_no_size(bad):
    with pytest.raises(ValueError):
        Diameter.parse(bad)


def test_diameter_in_pixels_from_micrometres_needs_the_pixel_size():
    assert Diameter("um", 9.0).pixels((0.5, 0.25)) == pytest.approx(9.0 / 0.375)
    assert Diameter("px", 30.0).pixels(None) == 30.0 and Diameter().pixels(None) is None
    with pytest.raises(InputError, match="does not record its pixel size"):
        Diameter("um", 9.0).pixels(None, name="a.tif")


def test_options_take_a_diameter_in_any_form_and_keep_it_typed():
    assert SegmentOptions().diameter == Diameter()
    assert SegmentOptions(diameter=24).diameter == Diameter("px", 24.0)
    assert SegmentOptions(diameter="native").diameter.kind == "native"
    assert SegmentOptions(diameter="9um").but(tile=256) == SegmentOptions(tile=256, diameter=Diameter("um", 9.0))
    for bad in (dict(tile=0), dict(batch_size=0), dict(post_workers=0), dict(context=-1), dict(diameter="x")):
        with pytest.raises(ValueError):
            SegmentOptions(**bad)
