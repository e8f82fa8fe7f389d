"""Visual question answering about world items, generated from their ground truth.

Each item gets one question of every type (`QUESTION_TYPES`), each with one true answer:
- an attribute question per attribute (`ATTRIBUTE_QUESTIONS`), answered by the value's word
  ("What colour are the objects?" -> "green");
- Pach et al.'s one-word prompt (`ONE_WORD_PROMPT`), answered by the shape word;
- "Describe the image." (`DESCRIBE_PROMPT`), answered by the canonical caption: every attribute
  named in one fixed order with its first caption word, the count by its value ("two small
  striped green circles on the left on a black background");
- yes/no existence questions in the manner of POPE (Li et al. 2023): "Is there a {colour}
  {shape} in the image?". The world's "objects" are (colour, shape) pairs, as COCO's are object
  classes. The positive names the item's pair ("yes"); each negative names a pair that is not
  in the image ("no"), one per POPE setting:
  - `pope_random`: a pair sharing neither the colour nor the shape of the item's;
  - `pope_popular`: POPE asks about the objects most frequent in the data. The world draws every
    colour and shape equally often, so what a language prior can lean on is which pairs training
    shows: the popular negative keeps the item's colour with another shape that the training split
    shows in that colour (for a held-out green circle, "green square", which training shows
    often, never "green circle");
  - `pope_adversarial`: POPE asks about objects that co-occur most with the image's own. In a
    world image the item's shape is what is there, so the adversarial negative keeps the item's
    shape in another colour ("blue circle" for a green circle): only binding colour to shape
    tells it apart.
  Every negative is drawn uniformly from the training split's pairs, so no training question
  names a held-out pair: were held-out pairs asked about in training, the answer would always be
  "no" (no training image shows one), and a model learns that instead of looking (a first world
  LLaVA did: 0.5 on every POPE setting, held out). A POPE setting's accuracy is over balanced
  pairs: the positive and that setting's negative.

Every question and answer of item `index` is a pure function of (seed, split, index), like the
item itself (`vqa_item`).
"""

import re
from dataclasses import dataclass

import numpy as np

from vlsae_ray.world.captions import tidy
from vlsae_ray.world.concepts import (
    ATTRIBUTES,
    BACKGROUND_WORDS,
    COLOUR_WORDS,
    PATTERN_WORDS,
    POSITION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    SPLITS,
    combos,
)
from vlsae_ray.world.generator import DEFAULT_IMAGE_SIZE, WorldItem, generate_item

ONE_WORD_PROMPT = "What is shown in this image? Use exactly one word!"
DESCRIBE_PROMPT = "Describe the image."
EXISTENCE_QUESTION = "Is there {article} {colour} {shape} in the image?"
ATTRIBUTE_QUESTIONS: dict[str, str] = {
    "shape": "What shape are the objects?",
    "colour": "What colour are the objects?",
    "count": "How many objects are there?",
    "size": "What size are the objects?",
    "position": "Where are the objects?",
    "background": "What is the background?",
    "pattern": "What pattern do the objects have?",
}
POPE_SETTINGS = ("pope_random", "pope_popular", "pope_adversarial")
QUESTION_TYPES = (*ATTRIBUTES, "one_word", "describe", "pope_positive", *POPE_SETTINGS)

# The words that name each attribute value in an answer, for `parse_answer`: the caption words
# (shapes in both numbers) and a few more; count leaves out "a", which also starts "a pair".
ANSWER_WORDS: dict[str, dict[str, list[str]]] = {
    "shape": {s: [w for pair in pairs for w in pair] for s, pairs in SHAPE_WORDS.items()},
    "colour": COLOUR_WORDS,
    "count": {"one": ["one", "single"], "two": ["two", "pair"], "three": ["three"]},
    "size": SIZE_WORDS,
    "position": {p: [p] for p in POSITION_WORDS} | {"centre": ["centre", "center", "middle"]},
    "background": {"black": ["black"], "gray": ["gray", "grey"], "noise": ["noise", "noisy", "static"]},
    "pattern": PATTERN_WORDS,
}


@dataclass(frozen=True)
class VQA:
    question_type: str  # one of QUESTION_TYPES
    question: str
    answer: str


def canonical_caption(labels: dict[str, str]) -> str:
    """Every attribute named by its first word, in one fixed order."""
    plural = labels["count"] != "one"
    words = [
        labels["count"],  # "one" rather than COUNT_WORDS' "a", so the count reads back unambiguously
        SIZE_WORDS[labels["size"]][0],
        PATTERN_WORDS[labels["pattern"]][0],
        COLOUR_WORDS[labels["colour"]][0],
        SHAPE_WORDS[labels["shape"]][0][1 if plural else 0],
        POSITION_WORDS[labels["position"]][0],
        BACKGROUND_WORDS[labels["background"]][0],
    ]
    return tidy(" ".join(words))


def existence_question(colour: str, shape: str) -> str:
    colour_word, shape_word = COLOUR_WORDS[colour][0], SHAPE_WORDS[shape][0][0]
    article = "an" if colour_word[0] in "aeiou" else "a"
    return EXISTENCE_QUESTION.format(article=article, colour=colour_word, shape=shape_word)


def pope_negatives(labels: dict[str, str], rng: np.random.Generator) -> dict[str, tuple[str, str]]:
    """One absent (colour, shape) pair per POPE setting (see the module docstring), each a training
    pair."""
    colour, shape = labels["colour"], labels["shape"]
    seen = combos("train")
    return {
        setting: pairs[rng.integers(len(pairs))]
        for setting, pairs in {
            "pope_random": [(c, s) for s, c in seen if c != colour and s != shape],
            "pope_popular": [(c, s) for s, c in seen if c == colour and s != shape],
            "pope_adversarial": [(c, s) for s, c in seen if c != colour and s == shape],
        }.items()
    }


VQA_STREAM = 3  # keeps the negatives' random draws apart from the item's own


def item_vqa(item: WorldItem, rng: np.random.Generator) -> list[VQA]:
    """One question of every type in `QUESTION_TYPES` about `item`, in that order."""
    labels = item.labels
    out = [VQA(a, ATTRIBUTE_QUESTIONS[a], labels[a]) for a in ATTRIBUTES]
    out.append(VQA("one_word", ONE_WORD_PROMPT, labels["shape"]))
    out.append(VQA("describe", DESCRIBE_PROMPT, canonical_caption(labels)))
    out.append(VQA("pope_positive", existence_question(labels["colour"], labels["shape"]), "yes"))
    for setting, (colour, shape) in pope_negatives(labels, rng).items():
        out.append(VQA(setting, existence_question(colour, shape), "no"))
    return out


def vqa_item(
    index: int, *, split: str = "train", seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE
) -> tuple[WorldItem, list[VQA]]:
    """Item `index` of `split` (as `generate_item` makes it) and its questions (`item_vqa`)."""
    item = generate_item(index, split=split, seed=seed, image_size=image_size)
    rng = np.random.default_rng([seed, SPLITS.index(split), index, VQA_STREAM])
    return item, item_vqa(item, rng)


def parse_answer(attribute: str, text: str) -> str | None:
    """The value of `attribute` that `text` names (synonyms and plurals count), or None.

    The earliest word of `text` that names a value decides, so "circle." and "two circles" parse.
    """
    if attribute not in ANSWER_WORDS:
        raise ValueError(f"unknown attribute {attribute!r}; use one of {tuple(ANSWER_WORDS)}")
    words = re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower())
    for i in range(len(words)):
        for value, names in ANSWER_WORDS[attribute].items():
            if any(words[i : i + len(n.split())] == n.split() for n in names):
                return value
    return None
