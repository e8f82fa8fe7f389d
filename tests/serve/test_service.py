"""The API's library (`vlsae_ray.interpret.service`) on a LLaVA backbone, in process: steering the
world LLaVA's answer through a served SAE equals steering it by hand, and bad requests fail clearly."""

import io

import pytest
from PIL import Image

from vlsae_ray.config import BackboneConfig, ServedSAEConfig
from vlsae_ray.interpret.service import BadInputError, Interpreter, TooLargeError, decode_image
from vlsae_ray.sae import build_sae
from vlsae_ray.steer import ABLATE, steered
from vlsae_ray.world import generate_items
from vlsae_ray.world.llava import VISION_FEATURE_HOOK, WORLD_LLAVA_PATH, answer

HOOK = VISION_FEATURE_HOOK.removeprefix("model.")  # hook points name modules of LlavaModel


@pytest.fixture(scope="module")
def llava_sae(tmp_path_factory):
    interpreter = Interpreter(BackboneConfig(library="llava", model=str(WORLD_LLAVA_PATH)))
    d = interpreter.backbone.model.config.vision_config.hidden_size
    sae = build_sae({"architecture": "topk", "d_in": d, "n_latents": 4 * d, "k": 8})
    root = tmp_path_factory.mktemp("llava-sae")
    sae.save(str(root / "sae"))
    return interpreter, interpreter.load("llava", ServedSAEConfig(sae=str(root / "sae"), hook_point=HOOK))


def test_llava_steer_equals_steering_by_hand(llava_sae):
    interpreter, served = llava_sae
    image, question = generate_items(1, split="test", seed=3)[0].image, "What colour is the object?"
    edits = [{"latent": 5, "op": "set", "value": 50.0}, {"latent": 7, "op": "ablate", "value": None}]
    got = interpreter.steer(served, image, edits, relative=False, question=question)
    model, processor = interpreter.backbone.model, interpreter.processor
    assert got["default"]["answer"] == answer(model, processor, [image], question)[0]
    with steered(model, VISION_FEATURE_HOOK, served.sae, {5: 50.0, 7: ABLATE}):
        assert got["steered"]["answer"] == answer(model, processor, [image], question)[0]
    assert got["default"]["labels"] is None
    with pytest.raises(BadInputError, match="question"):
        interpreter.steer(served, image, edits, relative=False, labels=["red"])
    with pytest.raises(BadInputError, match="absolute"):  # no catalog: no maximum to be relative to
        interpreter.steer(served, image, edits, relative=True, question=question)


def test_decode_image_checks_size_before_pixels():
    png = io.BytesIO()
    Image.new("RGB", (300, 200)).save(png, format="PNG")
    assert decode_image(png.getvalue(), 300 * 200).size == (300, 200)
    with pytest.raises(TooLargeError, match="300x200 = 60000 pixels"):
        decode_image(png.getvalue(), 300 * 200 - 1)
    with pytest.raises(BadInputError, match="empty"):
        decode_image(b"", 10)
    with pytest.raises(BadInputError, match="cannot be read"):
        decode_image(png.getvalue()[:60], 10**6)


def test_keys_come_from_file_and_environment_and_off_loopback_they_are_required(tmp_path, monkeypatch):
    from serve.app import KEYS_ENV, api_keys, build_app
    from vlsae_ray.backbones import builtin_backbone
    from vlsae_ray.config import ConfigError, ServeConfig

    monkeypatch.delenv(KEYS_ENV, raising=False)
    open_config = ServeConfig(
        backbone=builtin_backbone(), saes={"s": {"sae": "s", "hook_point": "visual"}}, host="0.0.0.0"
    )
    with pytest.raises(ConfigError, match="not loopback"):
        build_app(open_config)
    (tmp_path / "keys").write_text("a-key\n\n  b-key  \n")
    config = open_config.model_copy(update={"api_keys_file": str(tmp_path / "keys")})
    monkeypatch.setenv(KEYS_ENV, "c-key, ")
    assert api_keys(config) == [b"c-key", b"a-key", b"b-key"]
    with pytest.raises(ConfigError, match="does not exist"):
        api_keys(config.model_copy(update={"api_keys_file": str(tmp_path / "missing")}))
