"""Point text: formatting (docs/architecture.md#point-format), parsing (#point-parsing), counts, drawing."""
import numpy as np
import pytest
from PIL import Image

from molmo_jax.points import (NONE_ANSWER, draw_points, is_valid_point_format, parse_count, parse_points,
                              pixels_to_percent, points_to_text)


# ---------------------------------------------------------------------------------------------
# Formatting

def test_single_point_format():
    assert points_to_text(np.array([[12.34, 45.66]]), "mug", "mug") == \
        '<point x="12.3" y="45.7" alt="mug">mug</point>'


def test_several_points_sorted_x_then_y_with_one_decimal():
    pts = np.array([[50.0, 7.5], [12.5, 40.0], [12.5, 3.0]])
    assert points_to_text(pts, "red pen", "pens") == (
        '<points x1="12.5" y1="3.0" x2="12.5" y2="40.0" x3="50.0" y3="7.5" alt="red pen">pens</points>')


def test_sorting_uses_rounded_values():
    # 10.04 and 10.01 both round to 10.0, so y decides the order, as in the original.
    text = points_to_text(np.array([[10.04, 60.0], [10.01, 20.0]]), "a", "a")
    assert text.startswith('<points x1="10.0" y1="20.0" x2="10.0" y2="60.0"')


def test_negative_zero_is_written_as_zero():
    assert points_to_text(np.array([[-0.01, 5.0]]), "a", "b") == '<point x="0.0" y="5.0" alt="a">b</point>'


@pytest.mark.parametrize("bad", [np.zeros((0, 2)), np.array([1.0, 2.0]), np.array([[np.nan, 1.0]])])
def test_points_to_text_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        points_to_text(bad, "a", "a")


def test_pixels_to_percent():
    pct = pixels_to_percent(np.array([[320.0, 120.0], [0.0, 480.0]]), 640, 480)
    np.testing.assert_allclose(pct, [[50.0, 25.0], [0.0, 100.0]])
    with pytest.raises(ValueError, match="shape"):
        pixels_to_percent(np.zeros((3,)), 10, 10)
    with pytest.raises(ValueError, match="positive"):
        pixels_to_percent(np.zeros((1, 2)), 0, 10)


def test_format_parse_round_trip_random_point_sets():
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghij XYZ-_'0123456789")
    for _ in range(300):
        n = int(rng.integers(1, 25))
        pct = rng.uniform(0, 100, size=(n, 2))
        if rng.random() < 0.2:  # exact edges and duplicates
            pct[0] = [0.0, 100.0]
            pct[-1] = pct[0]
        alt = "".join(rng.choice(alphabet, size=int(rng.integers(0, 12))))
        width, height = int(rng.integers(1, 4000)), int(rng.integers(1, 4000))
        text = points_to_text(pct, alt, alt.upper())
        parsed = parse_points(text, width, height)
        expected = sorted((round(x, 1) + 0.0, round(y, 1) + 0.0) for x, y in pct)
        expected.sort(key=lambda p: p[0] * 10000 + p[1])
        np.testing.assert_allclose(parsed.points, np.array(expected) / 100 * [width, height], atol=1e-9)
        assert parsed.valid_format and parsed.dropped == 0
        assert parsed.alts == [alt] * n and parsed.texts == [alt.upper()] * n


# ---------------------------------------------------------------------------------------------
# Parsing

def test_parse_other_forms_in_order():
    text = 'Click(10.0, 20.0) then (30.5, 40.5), p=123,456 and x="5" y="6.5"'
    parsed = parse_points(text, 200, 100)
    np.testing.assert_allclose(parsed.points, [[20, 20], [61, 40.5], [24.6, 45.6], [10, 6.5]])
    assert parsed.alts == [None] * 4
    assert not parsed.valid_format  # a sentence, not a pure point answer


def test_parse_point_explanation_with_two_elements():
    text = ('The <point x="45.1" y="20.3" alt="lamp">lamp</point> is upside down, unlike the '
            '<points x1="10.0" y1="80.0" x2="30.5" y2="81.2" alt="chairs">chairs</points>.')
    parsed = parse_points(text, 1000, 500)
    np.testing.assert_allclose(parsed.points, [[451, 101.5], [100, 400], [305, 406]])
    assert parsed.alts == ["lamp", "chairs", "chairs"]
    assert parsed.texts == ["lamp", "chairs", "chairs"]
    assert not parsed.valid_format and parsed.dropped == 0


def test_truncated_generation_keeps_complete_pairs():
    text = '<points x1="10.0" y1="20.0" x2="30.0" y2="40.0" x3="55.'
    parsed = parse_points(text, 100, 100)
    np.testing.assert_allclose(parsed.points, [[10, 20], [30, 40]])
    assert not parsed.valid_format
    assert parsed.dropped == 1
    assert parsed.texts == [None, None]  # the tag never closed


def test_out_of_range_nan_and_unpaired_values_are_dropped():
    text = '<points x1="10.0" y1="20.0" x2="130.0" y2="5.0" x3="nan" y3="1.0" x4="7.0" alt="a">a</points>'
    parsed = parse_points(text, 100, 100)
    np.testing.assert_allclose(parsed.points, [[10, 20]])
    assert parsed.dropped == 3
    assert not parsed.valid_format  # "nan" is not a number in the accepted format


def test_value_over_100_outside_tags_is_dropped():
    parsed = parse_points("(120.0, 50.0)\n(10.0, 50.0)", 10, 10)
    np.testing.assert_allclose(parsed.points, [[1.0, 5.0]])
    assert parsed.dropped == 1


@pytest.mark.parametrize("garbage", ["", "There are none.", "<<<>>> </points> x=", "\x00\xff<point",
                                     "<point", '<points x1="', None, 42])
def test_garbage_never_raises(garbage):
    parsed = parse_points(garbage, 64, 48)
    assert parsed.points.shape == (0, 2)
    assert not parsed.valid_format


@pytest.mark.parametrize("text, valid", [
    ('<point x="1.0" y="2.0" alt="a">a</point>', True),
    ('  <points x1="1.0" y1="2.0" x2="3.0" y2="4.0" alt="a">a</points>\n', True),
    ("(10.0, 20.0)\n(30.0, 40.0)", True),
    ("p=123,456 p=100,200", True),
    ('<point x="1.0" y="2.0" alt="a">a</point> and more', False),
    ('<point x="1.0" y="2.0" alt="a">a</point><point x="3.0" y="4.0" alt="b">b</point>', False),
    ('Counting the <point x="1.0" y="2.0" alt="a">a</point> shows a total of 1.', False),
    ('<point x="1.0" y="2.0" alt="a">a', False),
    ("(10, 20)", False),
])
def test_format_validator(text, valid):
    assert is_valid_point_format(text) is valid


# ---------------------------------------------------------------------------------------------
# Counting answers

@pytest.mark.parametrize("text, count", [
    ('Counting the <points x1="1.0" y1="2.0" x2="3.0" y2="4.0" x3="5.0" y3="6.0" alt="cat">cat</points> '
     'shows a total of 3.', 3),
    ("7", 7), ("There are seven.", 7), ("twenty", 20), ("a total of 12 apples", 12),
    (NONE_ANSWER, 0), ("none", 0), ("There are no dogs.", None),
    ('<points x1="1.0" y1="2.0" x2="3.0" y2="4.0" alt="cat">cat</points>', 2),  # points only
    ('Counting the <points x1="1.0" y1="2.0" x2="3.0" y2="4.0" x3="5', 2),  # truncated
    ("I cannot tell.", None), ("", None), (None, None),
])
def test_parse_count(text, count):
    assert parse_count(text) == count


def test_parse_count_original_quirks():
    assert parse_count(NONE_ANSWER, none_as_zero=False) is None
    only_points = '<points x1="1.0" y1="2.0" x2="3.0" y2="4.0" alt="cat">cat</points>'
    assert parse_count(only_points, count_points=False) is None
    assert parse_count("There are 4.", none_as_zero=False, count_points=False) == 4


# ---------------------------------------------------------------------------------------------
# Drawing

def test_draw_points_writes_png_marking_the_points(tmp_path):
    image = np.full((48, 64, 3), 128, dtype=np.uint8)
    out = tmp_path / "points.png"
    pred, true = np.array([[10.0, 10.0], [50.0, 30.0]]), np.array([[30.0, 40.0]])
    assert draw_points(image, pred, str(out), true_points=true, radius=3) == str(out)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (64, 48)
        drawn = np.asarray(im.convert("RGB"))
    for x, y in pred.astype(int):
        assert tuple(drawn[y, x]) == (255, 0, 0)
    # The true point gets a green ring: its centre is untouched, its ring is green.
    assert tuple(drawn[40, 30]) == (128, 128, 128)
    ring = drawn[34:47, 24:37].reshape(-1, 3)
    assert any(tuple(p) == (0, 200, 0) for p in ring)
    assert tuple(drawn[0, 63]) == (128, 128, 128)  # far from every point: unchanged


def test_draw_points_accepts_a_path_and_no_points(tmp_path):
    src = tmp_path / "src.jpg"
    Image.new("RGB", (20, 10), (0, 0, 255)).save(src)
    out = tmp_path / "out.png"
    draw_points(str(src), np.zeros((0, 2)), str(out))
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (20, 10)
    draw_points(src.read_bytes(), [[5.0, 5.0]], str(out), radius=1)  # encoded bytes
    with Image.open(out) as im:
        assert im.size == (20, 10) and im.getpixel((5, 5)) == (255, 0, 0)
    with pytest.raises(ValueError, match="image"):
        draw_points(np.zeros((4, 4, 5), np.uint8), [[1, 1]], str(out))


def test_drawn_picture_is_what_the_model_saw(tmp_path):
    """An EXIF-rotated photo is drawn upright (as the preprocessor reads it) and a 16-bit image keeps its
    tones, so points land on the objects the model pointed at."""
    from molmo_jax.preprocess.image_io import load_image

    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:10, :10] = (250, 0, 0)  # a red corner, top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(rotated, exif=exif, quality=100)
    drawn = np.asarray(Image.open(draw_points(str(rotated), [], str(tmp_path / "r.png"))))
    seen = load_image(str(rotated))
    assert drawn.shape == seen.shape == (60, 40, 3)
    np.testing.assert_array_equal(drawn, seen)

    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((20, 30), 20000, np.uint16)).save(deep)
    drawn = np.asarray(Image.open(draw_points(str(deep), [], str(tmp_path / "d.png"))))
    np.testing.assert_array_equal(drawn, load_image(str(deep)))
    assert drawn.max() == round(20000 / 257)  # grey, not clipped to white
    from_array = np.asarray(Image.open(draw_points(np.full((20, 30, 3), 20000, np.uint16), [],
                                                   str(tmp_path / "a.png"))))
    assert from_array.max() == round(20000 / 257)
