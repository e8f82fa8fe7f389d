import pytest

from vlsae_ray.world.concepts import ATTRIBUTES, HELDOUT_COMBOS, combos
from vlsae_ray.world.generator import generate_item
from vlsae_ray.world.llava import build_tokenizer
from vlsae_ray.world.render import PALETTE
from vlsae_ray.world.vqa import (
    ANSWER_WORDS,
    ATTRIBUTE_QUESTIONS,
    POPE_SETTINGS,
    QUESTION_TYPES,
    parse_answer,
    vqa_item,
)

ITEMS = [vqa_item(i, split=split, seed=3) for split in ("train", "test") for i in range(60)]


def _pair(question: str) -> tuple[str, str]:
    """(colour, shape) that "Is there a {colour} {shape} in the image?" names."""
    words = question.split()
    return words[3], words[4]


def test_answers_agree_with_the_items_labels():
    for item, questions in ITEMS:
        assert [q.question_type for q in questions] == list(QUESTION_TYPES)
        by_type = {q.question_type: q for q in questions}
        for attribute in ATTRIBUTES:
            assert by_type[attribute].question == ATTRIBUTE_QUESTIONS[attribute]
            assert by_type[attribute].answer == item.labels[attribute]
            # the canonical caption names every attribute's value
            assert parse_answer(attribute, by_type["describe"].answer) == item.labels[attribute]
        assert by_type["one_word"].answer == item.labels["shape"]
        positive = by_type["pope_positive"]
        assert positive.answer == "yes"
        assert _pair(positive.question) == (item.labels["colour"], item.labels["shape"])


def test_pope_negatives_are_absent_and_of_their_kind():
    seen = set(combos("train"))
    kinds = {setting: set() for setting in POPE_SETTINGS}
    for item, questions in ITEMS:
        colour, shape = item.labels["colour"], item.labels["shape"]
        by_type = {q.question_type: q for q in questions}
        # what the image shows: its object pixels are its colour, never a negative's
        shown = item.pixels[item.mask].mean(0)
        for setting in POPE_SETTINGS:
            q = by_type[setting]
            assert q.answer == "no"
            c, s = _pair(q.question)
            assert (c, s) != (colour, shape)
            kinds[setting].add((c == colour, s == shape))
            if c != colour:
                assert abs(shown - PALETTE[c]).max() > 40, (item.id, setting)
            assert (s, c) in seen  # no question names a held-out pair
    assert kinds == {
        "pope_random": {(False, False)},
        "pope_popular": {(True, False)},
        "pope_adversarial": {(False, True)},
    }


def test_vqa_is_a_function_of_seed_split_and_index():
    item, questions = vqa_item(7, split="test", seed=3)
    again_item, again = vqa_item(7, split="test", seed=3)
    assert questions == again and (item.pixels == again_item.pixels).all()
    assert item.id == generate_item(7, split="test", seed=3).id
    assert (item.labels["shape"], item.labels["colour"]) in HELDOUT_COMBOS
    negatives = {vqa_item(i, split="test", seed=s)[1][-1].question for i in range(20) for s in (3, 4)}
    assert len(negatives) > 5  # the negatives are drawn, not fixed


def test_parse_answer_reads_synonyms_and_refuses_what_it_cannot_read():
    for attribute, values in ANSWER_WORDS.items():
        assert set(values) == set(ATTRIBUTES[attribute])
        for value, words in values.items():
            for word in words:
                assert parse_answer(attribute, f"I see {word}.") == value, (attribute, word)
    assert parse_answer("shape", "Two plus signs") == "cross"
    assert parse_answer("count", "a pair of stars") == "two"
    assert parse_answer("colour", "a large triangle") is None
    assert parse_answer("shape", "") is None
    assert parse_answer("colour", "red, then blue") == "red"  # the first value named decides
    with pytest.raises(ValueError, match="unknown attribute 'texture'"):
        parse_answer("texture", "striped")


def test_tokenizer_knows_every_word_of_the_world():
    tokenizer = build_tokenizer()
    texts = [q.question + " " + q.answer for _, questions in ITEMS for q in questions]
    texts += [item.caption for item, _ in ITEMS]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids, text
        assert ids[0] == tokenizer.bos_token_id
    assert tokenizer("a zebra").input_ids[-1] == tokenizer.unk_token_id
    ids = tokenizer("Two Red circles").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "two red circles"
