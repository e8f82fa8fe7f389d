import pytest
import torch

from vlsae_ray.world.llava import build_world_llava, load_world_llava
from vlsae_ray.world.train_llava import pack, packed_attention, prompt_ids, train_world_llava
from vlsae_ray.world.vqa import vqa_item


def test_packed_questions_get_the_logits_of_each_question_alone():
    """Training packs an image's questions behind one copy of its prompt; each must see only that."""
    torch.manual_seed(0)
    model, processor = build_world_llava(text_hidden=32, text_layers=2)
    tokenizer, n_image = processor.tokenizer, model.config.image_seq_length
    item, questions = vqa_item(0)
    singles = [
        prompt_ids(tokenizer, n_image, q.question) + tokenizer(q.answer, add_special_tokens=False).input_ids
        for q in questions[7:11]  # one-word, describe, and two yes/no questions: unequal lengths
    ]
    prefix = singles[0][: 3 + n_image]
    ids, positions, owner = pack(prefix, [s[len(prefix) :] for s in singles])
    pixels = processor.image_processor(item.image, return_tensors="pt")["pixel_values"]
    owner = torch.tensor([owner])
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([ids]),
            pixel_values=pixels,
            attention_mask=packed_attention(owner),
            position_ids=torch.tensor([positions]),
        ).logits[0]
        for s, single in enumerate(singles, start=1):
            alone = model(input_ids=torch.tensor([single]), pixel_values=pixels).logits[0]
            mine = torch.cat([packed[: len(prefix)], packed[owner[0] == s]])
            torch.testing.assert_close(mine, alone, atol=1e-5, rtol=1e-5)


def test_training_refuses_a_warmup_as_long_as_the_run(tmp_path):
    with pytest.raises(ValueError, match="warmup=100 must be at least 0 and below steps=40"):
        train_world_llava(tmp_path, steps=40)


def test_short_training_lowers_the_loss_and_saves_a_loadable_llava(tmp_path):
    result = train_world_llava(
        tmp_path / "llava",
        n_images=48,
        steps=40,
        batch_size=4,
        lr=1e-2,
        warmup=5,
        text_hidden=32,
        text_layers=1,
        log_every=0,
    )
    assert result.final_loss < 0.6 * result.first_loss, result
    model, processor = load_world_llava(tmp_path / "llava")
    assert model.config.text_config.hidden_size == 32
    # the vision tower is frozen: still the world CLIP's weights
    fresh, _ = build_world_llava(text_hidden=32, text_layers=1)
    tower, fresh_tower = model.model.vision_tower.state_dict(), fresh.model.vision_tower.state_dict()
    assert tower.keys() == fresh_tower.keys()
    assert all(torch.equal(tower[k], fresh_tower[k]) for k in tower)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
