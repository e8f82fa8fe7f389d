"""World POPE and world CHAIR: hallucination measured against the world's ground truth.

- World POPE (Li et al. 2023): per item the positive "Is there a {colour} {shape} in the image?"
  ("yes") and one negative per setting (`vqa.pope_negatives`: random, popular, adversarial), asked
  as balanced pairs. `pope_scores` gives accuracy, precision, recall, F1 (with "yes" as the
  positive class, as POPE) and the yes-ratio (POPE's sign of a model that agrees regardless).
- World CHAIR (Rohrbach et al. 2018): "Describe the image." answers parsed into the attribute
  values they name (`mentions`; every value, not only the first, so "a red circle and a blue
  circle" names two colours). A mention is hallucinated when the image does not have that value.
  CHAIR_i is the share of hallucinated mentions, CHAIR_s the share of descriptions with at least
  one; "objects" are the world's (colour, shape) objects (their colour and shape mentions),
  "attributes" the rest. Coverage, the share of an image's seven values a description names
  rightly, keeps a model from scoring well by saying less.
"""

from __future__ import annotations

import re

from vlsae_ray.world.concepts import ATTRIBUTES
from vlsae_ray.world.vqa import ANSWER_WORDS, POPE_SETTINGS

OBJECT_ATTRIBUTES = ("colour", "shape")


def pope_questions(items) -> dict[str, list[tuple[int, str, str]]]:
    """{setting: [(item position, question, answer)]} of `vqa_item` results: each item's positive and
    that setting's negative."""
    out = {setting: [] for setting in POPE_SETTINGS}
    for i, (_, vqa) in enumerate(items):
        by_type = {q.question_type: q for q in vqa}
        for setting in POPE_SETTINGS:
            for q in (by_type["pope_positive"], by_type[setting]):
                out[setting].append((i, q.question, q.answer))
    return out


def said_yes(reply: str) -> bool:
    words = re.findall(r"[a-z]+", reply.lower())
    return bool(words) and words[0] == "yes"


def pope_scores(replies: list[str], answers: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" the positive class) and yes-ratio of yes/no replies."""
    if len(replies) != len(answers) or not replies:
        raise ValueError(f"{len(replies)} replies for {len(answers)} answers")
    yes = [said_yes(r) for r in replies]
    truth = [a == "yes" for a in answers]
    tp = sum(y and t for y, t in zip(yes, truth, strict=True))
    fp = sum(y and not t for y, t in zip(yes, truth, strict=True))
    fn = sum(not y and t for y, t in zip(yes, truth, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": sum(y == t for y, t in zip(yes, truth, strict=True)) / len(yes),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(yes) / len(yes),
    }


def mentions(text: str) -> set[tuple[str, str]]:
    """Every (attribute, value) that `text` names, by the words `parse_answer` knows."""
    words = re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower())
    found = set()
    for attribute, values in ANSWER_WORDS.items():
        for value, names in values.items():
            for name in names:
                n = name.split()
                if any(words[i : i + len(n)] == n for i in range(len(words))):
                    found.add((attribute, value))
    return found


def chair(descriptions: list[str], labels: list[dict[str, str]]) -> dict[str, float]:
    """CHAIR_i and CHAIR_s over all mentions, over objects and over the other attributes, the
    hallucinated mentions per description, per-attribute hallucination rates and coverage."""
    if len(descriptions) != len(labels) or not descriptions:
        raise ValueError(f"{len(descriptions)} descriptions for {len(labels)} label sets")
    per_attribute = {a: [0, 0] for a in ATTRIBUTES}  # [hallucinated, mentioned]
    any_wrong, any_wrong_object, covered = 0, 0, 0
    for text, truth in zip(descriptions, labels, strict=True):
        named = mentions(text)
        wrong = {(a, v) for a, v in named if truth[a] != v}
        for a, _ in named:
            per_attribute[a][1] += 1
        for a, _ in wrong:
            per_attribute[a][0] += 1
        any_wrong += bool(wrong)
        any_wrong_object += any(a in OBJECT_ATTRIBUTES for a, _ in wrong)
        covered += len(named - wrong)
    n = len(descriptions)

    def share(attributes) -> float:
        wrong, named = (sum(per_attribute[a][i] for a in attributes) for i in (0, 1))
        return wrong / named if named else 0.0

    others = [a for a in ATTRIBUTES if a not in OBJECT_ATTRIBUTES]
    return {
        "chair_i": share(ATTRIBUTES),
        "chair_s": any_wrong / n,
        "chair_i_objects": share(OBJECT_ATTRIBUTES),
        "chair_s_objects": any_wrong_object / n,
        "chair_i_attributes": share(others),
        "hallucinated_per_description": sum(w for w, _ in per_attribute.values()) / n,
        "coverage": covered / (n * len(ATTRIBUTES)),
        **{f"hallucinated_{a}": (w / m if m else 0.0) for a, (w, m) in per_attribute.items()},
    }
