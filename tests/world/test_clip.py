import json
import re

import numpy as np
import open_clip
import pytest
import torch

from vlsae_ray.world.clip import CHECKPOINT_PATH, MODEL_NAME, load_world_clip, register_world_clip
from vlsae_ray.world.concepts import ATTRIBUTES, SHAPE_WORDS, combos
from vlsae_ray.world.generator import generate_items
from vlsae_ray.world.train import _encode_text, _hard_negatives, _lr_at, pixels_to_tensor, train_world_clip
from vlsae_ray.world.zeroshot import class_prompts, zero_shot_accuracy


@pytest.fixture(scope="module")
def world_clip():
    torch.set_num_threads(2)
    return load_world_clip()


def test_register_is_idempotent():
    assert register_world_clip() == register_world_clip() == MODEL_NAME
    assert open_clip.list_models().count(MODEL_NAME) == 1


def test_committed_checkpoint_is_small_and_loads_every_weight(world_clip):
    model, _, _ = world_clip
    assert CHECKPOINT_PATH.stat().st_size < 8 * 2**20
    saved = torch.load(CHECKPOINT_PATH, weights_only=True)["state_dict"]
    loaded = model.state_dict()
    assert set(saved) == set(loaded)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor.float()), name


@pytest.fixture(scope="module")
def heldout_accuracy(world_clip):
    # The user's path: open_clip.create_model_and_transforms(name, pretrained=FILE), its own
    # preprocess and tokenizer, scored on (shape, colour) pairs the model never saw in training.
    items = generate_items(2000, split="test", seed=11)
    return zero_shot_accuracy(*world_clip, items, attributes=("colour", "shape", "count"))


def test_committed_checkpoint_names_colour_shape_and_count_of_heldout_combinations(heldout_accuracy):
    # the targets: 90% for colour and for shape (chance 1/7 and 1/6)
    assert heldout_accuracy["colour"] >= 0.9, heldout_accuracy
    assert heldout_accuracy["shape"] >= 0.9, heldout_accuracy
    assert heldout_accuracy["count"] >= 0.8, heldout_accuracy


def test_prompts_never_name_a_shape_colour_pair():
    # A pair in a prompt would favour or penalise held-out pairs; see zeroshot._contexts.
    colour_prompts = class_prompts("colour", "red")
    assert all("red" in p and not any(s in p for s in ATTRIBUTES["shape"]) for p in colour_prompts)
    shape_prompts = class_prompts("shape", "star")
    assert all("star" in p and not any(c in p for c in ATTRIBUTES["colour"]) for p in shape_prompts)
    for prompt in class_prompts("count", "two"):
        assert prompt.startswith(("two", "a photo of two", "there are two")), prompt
        named_shape = any(n in prompt for pairs in SHAPE_WORDS.values() for pair in pairs for n in pair)
        named_colour = any(c in prompt for c in ATTRIBUTES["colour"])
        assert named_shape != named_colour, prompt


def test_training_is_reproducible_from_its_seed(tmp_path):
    runs = [
        train_world_clip(tmp_path / f"{i}.pt", seed=4, steps=2, batch_size=8, log_every=0) for i in range(2)
    ]
    a, b = (torch.load(r.checkpoint, weights_only=True)["state_dict"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].checkpoint_bytes == runs[0].checkpoint.stat().st_size
    model, _, _ = load_world_clip(checkpoint=runs[0].checkpoint)
    assert torch.equal(model.visual.conv1.weight, a["visual.conv1.weight"].float())


def test_training_pixels_match_the_preprocess_users_get(world_clip):
    _, preprocess, _ = world_clip
    items = generate_items(4, split="test")
    cfg = open_clip.get_model_preprocess_cfg(world_clip[0])
    fast = pixels_to_tensor(np.stack([it.pixels for it in items]), cfg["mean"], cfg["std"])
    assert torch.allclose(fast, torch.stack([preprocess(it.image) for it in items]), atol=1e-5)


def test_training_text_encoding_cuts_padding_without_changing_features_or_gradients(world_clip):
    model, _, tokenizer = world_clip
    items = generate_items(16, split="train", seed=3)
    tokens = tokenizer([it.caption for it in items] + _hard_negatives(items, step=0, seed=3))
    assert len(tokens.argmax(dim=-1).unique()) > 3  # several lengths, so several groups
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(len(tokens), model.text_projection.shape[1], generator=generator)
    text_tower = [
        p for n, p in model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"
    ]
    results = []
    for encode in (lambda t: model.encode_text(t, normalize=True), lambda t: _encode_text(model, t)):
        features = encode(tokens)
        results.append((features, torch.autograd.grad((features * weights).sum(), text_tower)))
    (expected, expected_grads), (features, grads) = results
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=1e-5)
    for expected_grad, grad in zip(expected_grads, grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=2e-5, rtol=1e-3)  # float32 sums in another order


def test_learning_rate_warms_up_holds_then_falls_linearly_to_zero():
    steps, lr, warmup = 400, 2e-3, 20
    rates = [_lr_at(step, steps, lr, warmup, cooldown=0.25) for step in range(steps)]
    assert rates[0] == lr / warmup and rates[warmup - 1] == lr
    assert set(rates[warmup:300]) == {lr}  # held until the last quarter
    falls = np.diff(rates[300:])
    np.testing.assert_allclose(falls, -lr / 100)  # a straight line from lr at step 300 ...
    assert rates[-1] == lr / 100  # ... to 0 one step past the end


def test_missing_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_world_clip"):
        load_world_clip(checkpoint=tmp_path / "absent.pt")


def _named_shapes(texts: list[str], plural: bool) -> set[str]:
    return {
        shape
        for shape, pairs in SHAPE_WORDS.items()
        for pair in pairs
        if any(re.search(rf"\b{pair[1 if plural else 0]}\b", t) for t in texts)
    }


def test_hard_negatives_swap_the_shape_to_every_other_shape_seen_in_the_items_colour():
    seen = set(combos("train"))
    for item in generate_items(60, split="train", seed=2):
        negatives = _hard_negatives([item], step=0, seed=2)
        assert negatives == _hard_negatives([item], step=0, seed=2)
        plural = item.labels["count"] != "one"
        if not _named_shapes([item.caption], plural):
            assert not _named_shapes(negatives, plural), negatives
            continue
        # (an other-attribute negative, when the caption names that attribute, keeps the own shape)
        swapped = _named_shapes(negatives, plural) - {item.labels["shape"]}
        expected = {s for s in ATTRIBUTES["shape"] if (s, item.labels["colour"]) in seen}
        assert swapped == expected - {item.labels["shape"]}, (item.caption, negatives)


def test_world_eval_command_reports_the_held_out_accuracy(capsys):
    from vlsae_ray.cli import main
    from vlsae_ray.world.zeroshot import evaluate_world_clip

    assert main(["world", "eval", "--n", "40"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == evaluate_world_clip(n=40)["accuracy"]
    assert report["n_images"] == 40 and report["split"] == "test"
