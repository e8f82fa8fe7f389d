"""World POPE and world CHAIR scores on hand-made replies."""

import pytest

from vlsae_ray.world.hallucination import chair, mentions, pope_questions, pope_scores
from vlsae_ray.world.vqa import POPE_SETTINGS, vqa_item

LABELS = {
    "shape": "circle",
    "colour": "green",
    "size": "small",
    "position": "left",
    "count": "two",
    "pattern": "striped",
    "background": "black",
}


def test_pope_scores_count_yes_as_the_positive_class():
    replies = ["yes", "Yes.", "no", "yes", "no", "no"]
    answers = ["yes", "yes", "yes", "no", "no", "no"]
    scores = pope_scores(replies, answers)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["yes_ratio"] == pytest.approx(3 / 6)
    assert pope_scores(["no"] * 2, ["yes", "no"])["f1"] == 0.0


def test_pope_questions_pair_each_positive_with_each_setting_negative():
    items = [vqa_item(i, split="test", seed=0) for i in range(3)]
    pairs = pope_questions(items)
    for setting in POPE_SETTINGS:
        assert [a for _, _, a in pairs[setting]] == ["yes", "no"] * 3
        assert [i for i, _, _ in pairs[setting]] == [0, 0, 1, 1, 2, 2]


def test_chair_counts_every_named_value_the_image_lacks():
    right = "two small striped green circles on the left on a black background"
    assert mentions(right) == set(LABELS.items())
    wrong = "two small dotted green circles and a red square on the left on black"  # dotted, red, square
    scores = chair([right, wrong], [LABELS, LABELS])
    # right names 7 values; wrong names count, size, pattern, 2 colours, 2 shapes, position, background
    assert scores["chair_i"] == pytest.approx(3 / 16)
    assert scores["chair_s"] == pytest.approx(1 / 2)
    assert scores["chair_i_objects"] == pytest.approx(2 / 6)
    assert scores["chair_s_objects"] == pytest.approx(1 / 2)
    assert scores["hallucinated_per_description"] == pytest.approx(3 / 2)
    assert scores["coverage"] == pytest.approx((7 + 6) / 14)
    assert scores["hallucinated_pattern"] == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="2 descriptions for 1 label sets"):
        chair([right, wrong], [LABELS])
