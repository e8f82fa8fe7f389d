import numpy as np
import open_clip
import pytest
import torch

from vlsae_ray.world.clip import CHECKPOINT_PATH, MODEL_NAME, load_world_clip, register_world_clip
from vlsae_ray.world.concepts import ATTRIBUTES, SHAPE_WORDS
from vlsae_ray.world.generator import generate_items
from vlsae_ray.world.train import pixels_to_tensor, train_world_clip
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
    items = generate_items(300, split="test", seed=11)
    return zero_shot_accuracy(*world_clip, items, attributes=("colour", "shape", "count"))


def test_committed_checkpoint_names_colour_and_count_of_heldout_combinations(heldout_accuracy):
    assert heldout_accuracy["colour"] >= 0.9, heldout_accuracy
    assert heldout_accuracy["count"] >= 0.8, heldout_accuracy


@pytest.mark.xfail(strict=True, reason="world CLIP does not yet recognise shape on held-out pairs")
def test_committed_checkpoint_names_shape_of_heldout_combinations(heldout_accuracy):
    assert heldout_accuracy["shape"] >= 0.9, heldout_accuracy


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


def test_training_on_sibling_groups_runs_and_is_recorded(tmp_path):
    run = train_world_clip(tmp_path / "s.pt", seed=4, steps=1, batch_size=7, siblings=True, log_every=0)
    assert torch.load(run.checkpoint, weights_only=True)["world_training"]["siblings"] is True


def test_training_pixels_match_the_preprocess_users_get(world_clip):
    _, preprocess, _ = world_clip
    items = generate_items(4, split="test")
    cfg = open_clip.get_model_preprocess_cfg(world_clip[0])
    fast = pixels_to_tensor(np.stack([it.pixels for it in items]), cfg["mean"], cfg["std"])
    assert torch.allclose(fast, torch.stack([preprocess(it.image) for it in items]), atol=1e-5)


def test_missing_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_world_clip"):
        load_world_clip(checkpoint=tmp_path / "absent.pt")
