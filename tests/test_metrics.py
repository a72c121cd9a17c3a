"""Evaluation metrics on hand-made predictions with known scores (docs/architecture.md#metrics)."""
import math

import numpy as np
import pytest
from scipy.special import logsumexp

from molmo_jax.metrics import (LossAccumulator, anls, clock_accuracy, counting_metrics, decode_rle,
                               edit_distance, exact_match, loss_and_perplexity, multiple_choice_accuracy,
                               normalize_vqa_answer, parse_clock_time, pointing_metrics, pointing_scores,
                               postprocess_answer, relaxed_accuracy, select_option, token_loss_sum,
                               vqa_accuracy)


def pts(*xy):
    """<points> text from percent pairs, written by hand (not through points_to_text)."""
    if len(xy) == 1:
        return f'<point x="{xy[0][0]:.1f}" y="{xy[0][1]:.1f}" alt="o">o</point>'
    coords = " ".join(f'x{i}="{x:.1f}" y{i}="{y:.1f}"' for i, (x, y) in enumerate(xy, 1))
    return f'<points {coords} alt="o">o</points>'


# ---------------------------------------------------------------------------------------------
# Pointing

def test_pointing_with_box_masks():
    # Image 100x80; objects are boxes around (20, 20) and (70, 50) pixels.
    gt = [[20, 20], [70, 50]]
    boxes = [[10, 10, 20, 20], [60, 40, 20, 20]]
    pred = pts((22.0, 18.0), (75.0, 60.0), (50.0, 90.0))  # -> (22, 14.4), (75, 48), (50, 72) px
    s = pointing_scores(pred, gt, 100, 80, boxes)
    assert (s["hits"], s["n_pred"], s["n_gt"]) == (2, 3, 2)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == 1.0 and s["f1"] == pytest.approx(0.8)


def test_pointing_matched_but_outside_mask_is_a_miss():
    s = pointing_scores(pts((40.0, 40.0)), [[20, 20]], 100, 100, [[10, 10, 20, 20]])
    assert (s["precision"], s["recall"], s["f1"]) == (0.0, 0.0, 0.0)


def test_pointing_matching_is_one_to_one():
    # Two predictions on the same object: only one can be matched to it.
    s = pointing_scores(pts((10.0, 10.0), (11.0, 11.0)), [[10, 10], [90, 90]], 100, 100)
    assert s["hits"] == 1 and s["precision"] == 0.5 and s["recall"] == 0.5


def test_decode_rle_is_column_major():
    expected = np.array([[0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(decode_rle({"size": [3, 4], "counts": [3, 2, 2, 1, 4]}), expected)
    with pytest.raises(ValueError, match="sum"):
        decode_rle({"size": [3, 4], "counts": [3, 2]})
    with pytest.raises(ValueError, match="compressed"):
        decode_rle({"size": [3, 4], "counts": "abc"})


def test_pointing_with_rle_and_array_masks():
    rle = {"size": [3, 4], "counts": [3, 2, 2, 1, 4]}  # ones at (x, y) = (1, 0), (1, 1), (2, 1)
    hit = pts((50.0, 33.3))  # (2.0, 0.999) px -> rounds to (2, 1): inside
    miss = pts((75.0, 33.3))  # (3.0, 0.999) px -> (3, 1): outside
    assert pointing_scores(hit, [[1, 1]], 4, 3, [rle])["f1"] == 1.0
    assert pointing_scores(hit, [[1, 1]], 4, 3, rle)["f1"] == 1.0  # a single region for a single point
    assert pointing_scores(miss, [[1, 1]], 4, 3, [rle])["f1"] == 0.0
    array = decode_rle(rle)
    assert pointing_scores(hit, [[1, 1]], 4, 3, np.stack([array]))["f1"] == 1.0


def test_point_on_the_far_edge_is_outside_the_image():
    # 100% -> x = W, which is not a pixel of the image, even with a whole-image mask.
    s = pointing_scores(pts((100.0, 50.0)), [[99, 50]], 100, 100, [[0, 0, 100, 100]])
    assert s["hits"] == 0


def test_pointing_distance_threshold_without_masks():
    # Image 400x300: diagonal 500, so the default hit radius is 25 px.
    gt = [[100, 90]]
    on_radius = pts((30.0, 35.0))  # (120, 105) px: distance exactly 25
    beyond = pts((30.1, 35.0))  # (120.4, 105) px: distance 25.3
    assert pointing_scores(on_radius, gt, 400, 300)["f1"] == 1.0
    assert pointing_scores(beyond, gt, 400, 300)["f1"] == 0.0
    assert pointing_scores(beyond, gt, 400, 300, distance_threshold=30.0)["f1"] == 1.0


def test_pointing_empty_ground_truth():
    assert pointing_scores("There are none.", [], 50, 50)["f1"] == 1.0
    s = pointing_scores(pts((10.0, 10.0)), [], 50, 50)
    assert (s["precision"], s["recall"], s["f1"]) == (0.0, 0.0, 0.0)


def test_pointing_invalid_format_scores_zero_even_on_target():
    text = "It is here: " + pts((50.0, 50.0))
    s = pointing_scores(text, [[50, 50]], 100, 100)
    assert not s["valid_format"] and s["f1"] == 0.0
    assert pointing_scores("There are none.", [[50, 50]], 100, 100)["f1"] == 0.0


def test_pointing_original_units_change_the_assignment():
    # 1000x1000 image. The prediction (60, 60) px sits on object A at (50, 50). In the original's
    # mixed units the GT becomes A=(5, 5), B=(90, 90) (percent), and (60, 60) is nearer to B.
    gt, boxes = [[50, 50], [900, 900]], [[40, 40, 21, 21], [890, 890, 21, 21]]
    pred = pts((6.0, 6.0))
    right = pointing_scores(pred, gt, 1000, 1000, boxes)
    original = pointing_scores(pred, gt, 1000, 1000, boxes, original_units=True)
    assert right["hits"] == 1 and right["precision"] == 1.0 and right["recall"] == 0.5
    assert original["hits"] == 0 and original["f1"] == 0.0


def test_pointing_bad_masks_raise_clear_errors():
    with pytest.raises(ValueError, match="2 masks for 1"):
        pointing_scores(pts((5.0, 5.0)), [[5, 5]], 10, 10, [[0, 0, 5, 5], [0, 0, 5, 5]])
    with pytest.raises(ValueError, match="does not match the image size"):
        pointing_scores(pts((5.0, 5.0)), [[5, 5]], 10, 10, [np.zeros((4, 4), bool)])


def test_pointing_metrics_average_over_examples():
    scores = [pointing_scores(pts((10.0, 10.0)), [[10, 10]], 100, 100),
              pointing_scores(pts((90.0, 90.0)), [[10, 10]], 100, 100),
              pointing_scores("There are none.", [], 100, 100)]
    m = pointing_metrics(scores)
    assert m["precision"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3) and m["n"] == 3
    assert m["valid"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------
# Counting

COUNT_PREDICTIONS = [
    'Counting the <points x1="1.0" y1="1.0" x2="2.0" y2="2.0" x3="3.0" y3="3.0" alt="a">a</points> '
    "shows a total of 3.",
    "There are 2.", "5", "There are none.", "garbage"]
COUNT_TRUTH = [3, 3, 3, 0, 2]


def test_counting_metrics():
    m = counting_metrics(COUNT_PREDICTIONS, COUNT_TRUTH)
    assert (m["accuracy"], m["close"], m["valid"], m["n"]) == (2 / 5, 3 / 5, 4 / 5, 5)
    assert m["per_count"] == {0: 1.0, 2: 0.0, 3: pytest.approx(1 / 3)}
    assert m["per_count_mean"] == pytest.approx(4 / 9)


def test_counting_metrics_original_quirks():
    m = counting_metrics(COUNT_PREDICTIONS, COUNT_TRUTH, original_quirks=True)
    assert (m["accuracy"], m["close"], m["valid"]) == (1 / 5, 2 / 5, 3 / 5)
    assert m["per_count"][0] == 0.0 and m["per_count_mean"] == pytest.approx(1 / 9)


def test_counting_metrics_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        counting_metrics(["1", "2"], [1])


# ---------------------------------------------------------------------------------------------
# Short answers

@pytest.mark.parametrize("raw, norm", [
    ("The Dog's bone, isnt it?", "dog's bone isn't it"), ("1,000.5 dollars.", "1000.5 dollars"),
    ("two-thirds", "2 thirds"), ("Yes!", "yes"), ("None", "0"), ("an apple", "apple"),
    ("3.5", "3.5"), ("left / right", "left right"), (" Ten\n", "10"),
])
def test_normalize_vqa_answer(raw, norm):
    assert normalize_vqa_answer(raw) == norm


def test_vqa_accuracy():
    assert vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7) == 1.0
    assert vqa_accuracy("2", ["2", "2"] + ["3"] * 8) == pytest.approx(2 / 3)
    assert vqa_accuracy("the cat.", ["cat"] + ["dog"] * 9) == pytest.approx(1 / 3)
    assert vqa_accuracy("dont know", ["don't know"] * 3) == 1.0
    assert vqa_accuracy("yes", ["no"] * 10) == 0.0
    assert vqa_accuracy("Cat", ["cat ", "cat", "the cat"], normalize=False) == pytest.approx(2 / 3)


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3 == edit_distance("sitting", "kitten")
    assert edit_distance("", "abc") == 3 and edit_distance("same", "same") == 0


def test_anls():
    assert anls("HELLO ", ["hello"]) == 1.0
    assert anls("helo", ["hello"]) == pytest.approx(0.8)
    assert anls("ab", ["ac"]) == 0.0  # NLD exactly 0.5 is not below the threshold
    assert anls("abc", ["xyz", "abd"]) == pytest.approx(2 / 3)  # best reference counts
    assert anls("", [""]) == 1.0


@pytest.mark.parametrize("pred, answers, score", [
    ("10.4", ["10"], 1.0), ("10.6", ["10"], 0.0), ("50%", ["0.51"], 1.0), ("Yes", ["yes"], 1.0),
    ("0", ["0"], 1.0), ("0.01", ["0"], 0.0), ("abc", ["10"], 0.0), ("9", ["x", "9.3"], 1.0),
])
def test_relaxed_accuracy(pred, answers, score):
    assert relaxed_accuracy(pred, answers) == score


def test_postprocess_answer():
    assert postprocess_answer("Let me think.\nAnswer:  the  dog ") == "the dog"
    assert postprocess_answer("x\ny  z\ny z\n") == "y z"
    assert postprocess_answer("a\nb\nb\n a ") == "a"  # tie: the earliest line
    assert postprocess_answer("  hello   world ") == "hello world"


@pytest.mark.parametrize("pred, index", [
    ("Green", 1), ("B", 1), ("(C)", 2), ("c.", 2), ("A: red", 0), ("The answer is blue", 2),
    ("gren", 1), ("bl", 2),
])
def test_select_option(pred, index):
    assert select_option(pred, ["red", "green", "blue"]) == index


def test_multiple_choice_and_exact_match():
    options = ["red", "green", "blue"]
    assert multiple_choice_accuracy("B", ["green"], options) == 1.0
    assert multiple_choice_accuracy("green", ["B"], options) == 1.0
    assert multiple_choice_accuracy("greenish", [1], options) == 1.0
    assert multiple_choice_accuracy("red", ["green"], options) == 0.0
    assert multiple_choice_accuracy("Paris.", ["paris"]) == 1.0
    assert exact_match("Paris", ["London", "paris "]) == 1.0 and exact_match("Pari", ["paris"]) == 0.0


# ---------------------------------------------------------------------------------------------
# Clocks

@pytest.mark.parametrize("text, time", [
    ("10:15", (10, 15)), ("The time is 3:45 PM.", (3, 45)), ("22:05:30", (10, 5)),
    ("quarter past ten", (10, 15)), ("half past 3", (3, 30)), ("a quarter to twelve", (11, 45)),
    ("twenty to eleven", (10, 40)), ("twenty-five past seven", (7, 25)), ("5 minutes after 2", (2, 5)),
    ("ten fifteen", (10, 15)), ("ten oh five", (10, 5)), ("It is 12 o'clock", (0, 0)),
    ("noon", (0, 0)), ("I can't tell", None), ("99:99", None),
])
def test_parse_clock_time(text, time):
    assert parse_clock_time(text) == time


def test_clock_accuracy_tolerance():
    assert clock_accuracy("10:15", "quarter past ten") == 1.0
    assert clock_accuracy("22:15", "10:15") == 1.0  # an analog dial has no AM/PM
    assert clock_accuracy("10:14", "10:15") == 0.0
    assert clock_accuracy("10:14", "10:15", minute_tolerance=1) == 1.0
    assert clock_accuracy("11:59", (12, 1), minute_tolerance=2) == 1.0  # across the top of the dial
    assert clock_accuracy("no idea", "10:15") == 0.0
    with pytest.raises(ValueError, match="reference"):
        clock_accuracy("10:15", "sometime")


# ---------------------------------------------------------------------------------------------
# Loss and perplexity

def test_token_loss_sum_matches_manual_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 7))
    targets = np.array([[3, 1, -1, -1], [0, 6, 2, -1]])
    weights = np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 2.0, 0.0]])
    loss, weight = token_loss_sum(logits, targets, weights)
    expected = sum(w * (logsumexp(logits[b, t]) - logits[b, t, targets[b, t]])
                   for b in range(2) for t in range(4) if (w := weights[b, t]) > 0)
    assert loss == pytest.approx(expected) and weight == 4.5
    with pytest.raises(ValueError, match="shapes"):
        token_loss_sum(logits, targets[:, :3], weights)


def test_loss_accumulator_uses_global_token_mean():
    acc = LossAccumulator()
    acc.add(6.0, 2.0)   # batch mean 3
    acc.add(2.0, 8.0)   # batch mean 0.25
    result = acc.result()
    assert result["loss"] == pytest.approx(0.8) and result["perplexity"] == pytest.approx(math.exp(0.8))
    uniform = token_loss_sum(np.zeros((1, 3, 11)), np.array([[1, 2, 3]]), np.ones((1, 3)))
    assert loss_and_perplexity(*uniform)["perplexity"] == pytest.approx(11.0)
    with pytest.raises(ValueError, match="no loss weight"):
        loss_and_perplexity(0.0, 0.0)
