import open_clip
import pytest
import torch

from vlsae_ray.world.clip import CHECKPOINT_PATH, MODEL_NAME, load_world_clip, register_world_clip
from vlsae_ray.world.generator import generate_items
from vlsae_ray.world.train import train_world_clip
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


def test_committed_checkpoint_classifies_heldout_combinations(world_clip):
    # The user's path: open_clip.create_model_and_transforms(name, pretrained=FILE), its own
    # preprocess and tokenizer, scored on (shape, colour) pairs the model never saw in training.
    items = generate_items(300, split="test", seed=11)
    accuracy = zero_shot_accuracy(*world_clip, items, attributes=("colour", "shape", "size"))
    assert accuracy["colour"] >= 0.85, accuracy
    assert accuracy["shape"] >= 0.85, accuracy
    assert accuracy["size"] >= 0.7, accuracy


def test_prompts_name_their_class_in_every_context():
    prompts = class_prompts("colour", "red")
    assert all("red" in p for p in prompts)
    assert {p.split()[-1] for p in prompts if p.startswith("a red")} >= {"circle", "star", "heart"}
    assert all(
        p.startswith(("two", "a photo of two", "there are two")) for p in class_prompts("count", "two")
    )


def test_training_is_reproducible_from_its_seed(tmp_path):
    runs = [
        train_world_clip(tmp_path / f"{i}.pt", seed=4, steps=2, batch_size=8, log_every=0) for i in range(2)
    ]
    a, b = (torch.load(r.checkpoint, weights_only=True)["state_dict"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].checkpoint_bytes == runs[0].checkpoint.stat().st_size
    model, _, _ = load_world_clip(checkpoint=runs[0].checkpoint)
    assert torch.equal(model.visual.conv1.weight, a["visual.conv1.weight"].float())


def test_missing_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_world_clip"):
        load_world_clip(checkpoint=tmp_path / "absent.pt")
