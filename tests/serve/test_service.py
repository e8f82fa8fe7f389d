"""The API's library (`vlsae_ray.interpret.service`) on a LLaVA backbone, in process: steering the
world LLaVA's answer through a served SAE equals steering it by hand, mitigating hallucination
through a served VL-SAE and its aligner equals `generate_mitigated` by hand, and bad requests fail
clearly."""

import io

import pytest
import torch
from PIL import Image

from vlsae_ray.config import BackboneConfig, ServedSAEConfig
from vlsae_ray.interpret.service import BadInputError, Interpreter, TooLargeError, decode_image
from vlsae_ray.sae import SparseAutoencoder, build_sae
from vlsae_ray.sae.aligner import Aligner, AlignerConfig
from vlsae_ray.steer import ABLATE, steered
from vlsae_ray.steer.hallucination import generate_mitigated
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


def test_llava_mitigation_equals_generate_mitigated_by_hand(llava_sae, tmp_path):
    interpreter, image_only = llava_sae
    model, processor = interpreter.backbone.model, interpreter.processor
    torch.manual_seed(0)
    aligner = Aligner(AlignerConfig(d_in=model.config.text_config.hidden_size, d_proj=32))
    aligner.save(str(tmp_path / "aligner"))
    build_sae({"architecture": "vl_sae", "d_in": 32, "n_latents": 256, "k": 8}).save(str(tmp_path / "sae"))
    hook = "language_model.layers.2:chat_image_mean"  # the output of layer 1 is edited
    config = ServedSAEConfig(
        sae=str(tmp_path / "sae"),
        hook_point=hook,
        text_hook_point=hook.replace("image", "text"),
        token="mean",
        aligner=str(tmp_path / "aligner"),
    )
    served = interpreter.load("vl", config)
    image, question = generate_items(1, split="test", seed=4)[0].image, "Describe the image."
    settings = {"alpha": 1.0, "beta": 1.0, "cd_alpha": 0.9, "cd_beta": 0.1}
    got = interpreter.mitigate(served, image, question, **settings)
    by_hand = generate_mitigated(
        model, processor, [image], question, Aligner.load(config.aligner), SparseAutoencoder.load(config.sae),
        layer=1, **settings,
    )[0]  # fmt: skip
    assert got == {"default": answer(model, processor, [image], question)[0], "mitigated": by_hand}
    # the SAE reads the aligner's projections: its codes of an image are those of the projected mean
    rows = interpreter.image_rows([hook], [image], served.config.token)[hook].values
    expected = served.sae.encode(served.aligner.project(rows, "vision"))[0]
    torch.testing.assert_close(interpreter.image_codes([(served, image)])[0], expected)
    # the image mean is read with an empty caption: the image's positions come before any caption
    captioned = interpreter.backbone.activations(
        [hook], pixels=interpreter.backbone.pixels([image]), texts=["a large red circle"], item_ids=["0"],
        token=served.config.token,
    )[hook].values  # fmt: skip
    torch.testing.assert_close(rows, captioned)
    pair = interpreter.interpret(served, image, "a large red circle", 5)
    assert len(pair["image"]) == len(pair["caption"]) == 5 and pair["shared"] is not None
    with pytest.raises(BadInputError, match="reads a caption after its image"):
        interpreter.interpret(served, None, "a large red circle", 5)
    with pytest.raises(BadInputError, match="cd_beta=0.0 must lie in"):
        interpreter.mitigate(served, image, question, **{**settings, "cd_beta": 0.0})
    with pytest.raises(BadInputError, match="cannot mitigate: that needs a LLaVA backbone and a VL-SAE"):
        interpreter.mitigate(image_only, image, question, **settings)
    Aligner(AlignerConfig(d_in=aligner.config.d_in, d_proj=16)).save(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="its aligner projects to 16"):
        interpreter.load("vl", config.model_copy(update={"aligner": str(tmp_path / "other")}))


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
