"""`steered`: exact no-op without edits, the two modes against hand-written forwards, edit semantics
checked by encoding the steered activation again, per-row batching, and hook hygiene."""

import pytest
import torch

from vlsae_ray.sae import build_sae
from vlsae_ray.steer import ABLATE, Edit, steered
from vlsae_ray.world import generate_items, load_world_clip

BLOCK = "visual.transformer.resblocks.2"


@pytest.fixture(scope="module")
def clip():
    model, preprocess, _ = load_world_clip()
    items = generate_items(6, split="test", seed=3)
    return model.eval(), torch.stack([preprocess(it.image) for it in items])


def _sae(architecture="topk", d=96, n_latents=256, seed=0, **extra):
    torch.manual_seed(seed)
    config = {"architecture": architecture, "d_in": d, "n_latents": n_latents, **extra}
    if architecture in ("topk", "batchtopk"):
        config.setdefault("k", 8)
    sae = build_sae(config).eval()
    with torch.no_grad():
        sae.b_dec_d.normal_(0, 0.1)
        if sae.has_encoder_bias:
            sae.b_enc_f.normal_(0, 0.1)
    return sae


def _orthonormal_sae(d=96, n_latents=48):
    """A ReLU SAE whose encoder inverts its decoder (orthonormal rows, W_enc = W_dec, no encoder bias):
    encode(decode(z)) = z for any z >= 0, so an edit can be read back exactly."""
    sae = _sae("relu", d, n_latents)
    q, _ = torch.linalg.qr(torch.randn(d, n_latents))
    with torch.no_grad():
        sae.W_dec_fd.copy_(q.T)
        sae.W_enc_fd.copy_(q.T)
        sae.b_enc_f.zero_()
    return sae


def _block_output(model, pixels):
    """The hook point's output as the next module sees it (after every hook on it)."""
    seen = {}
    handle = model.get_submodule("visual.transformer.resblocks.3").register_forward_pre_hook(
        lambda _m, args: seen.setdefault("x", args[0].clone())
    )
    try:
        model.encode_image(pixels)
    finally:
        handle.remove()
    return seen["x"]


def test_no_edits_in_delta_mode_leave_clip_bit_identical(clip):
    model, pixels = clip
    plain = model.encode_image(pixels)
    sae = _sae()
    for edits in ({}, [{}] * len(pixels)):
        with steered(model, BLOCK, sae, edits):
            assert torch.equal(model.encode_image(pixels), plain)
    with steered(model, BLOCK, sae, {3: 2.0}):  # an edit does change the embedding
        assert not torch.allclose(model.encode_image(pixels), plain)


def test_reconstruction_mode_equals_a_hand_written_forward(clip):
    model, pixels = clip
    sae = _sae(n_latents=384, k=12)
    visual = model.visual

    def by_hand(edit_latent=None, value=0.0):
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(len(x), 1, -1)
        x = visual.ln_pre(torch.cat([cls, x], 1) + visual.positional_embedding)
        for i, block in enumerate(visual.transformer.resblocks):
            x = block(x)
            if i == 2:
                z = sae.encode(x.reshape(-1, x.shape[-1]))
                if edit_latent is not None:
                    z[:, edit_latent] = value
                x = sae.decode(z).reshape(x.shape)
        return visual.ln_post(x[:, 0]) @ visual.proj

    with torch.no_grad():
        expected, expected_edit = by_hand(), by_hand(7, 1.5)
        with steered(model, BLOCK, sae, {}, mode="reconstruction"):
            torch.testing.assert_close(model.visual(pixels), expected, rtol=1e-4, atol=1e-5)
        with steered(model, BLOCK, sae, {7: 1.5}, mode="reconstruction"):
            torch.testing.assert_close(model.visual(pixels), expected_edit, rtol=1e-4, atol=1e-5)


def test_an_edit_is_read_back_exactly_by_an_encoder_that_allows_it(clip):
    model, pixels = clip
    sae = _orthonormal_sae()
    with torch.no_grad():
        h = _block_output(model, pixels).reshape(-1, 96)
        z = sae.encode(h)
    j = int((z > 0).float().mean(0).argmax())  # a latent active on most tokens
    active = z[:, j] > 0
    cases = [
        ({j: 4.0}, lambda z_j: torch.full_like(z_j, 4.0)),
        ({j: Edit("add", 0.5)}, lambda z_j: z_j + 0.5),
        ({j: Edit("scale", 3.0)}, lambda z_j: 3 * z_j),
        ({j: ABLATE}, lambda z_j: torch.zeros_like(z_j)),
    ]
    for mode in ("reconstruction", "delta"):
        for edits, expected in cases:
            with steered(model, BLOCK, sae, edits, mode=mode):
                z_after = sae.encode(_block_output(model, pixels).reshape(-1, 96))
            # delta mode moves h along latent j's direction, which an inactive ReLU latent
            # (negative pre-activation) only partly sees; reconstruction mode sets every token
            rows = slice(None) if mode == "reconstruction" else active
            torch.testing.assert_close(z_after[rows, j], expected(z[rows, j]), rtol=1e-4, atol=1e-4)
            others = torch.arange(z.shape[1]) != j
            torch.testing.assert_close(z_after[rows][:, others], z[rows][:, others], rtol=1e-4, atol=1e-4)
    # values relative to a latent's maximum activation
    with steered(model, BLOCK, sae, {j: 2.0}, mode="reconstruction", max_activations={j: 1.25}):
        z_after = sae.encode(_block_output(model, pixels).reshape(-1, 96))
    torch.testing.assert_close(z_after[:, j], torch.full_like(z_after[:, j], 2.5), rtol=1e-4, atol=1e-4)


def test_token_choice_edits_only_those_tokens(clip):
    model, pixels = clip
    sae = _sae()
    plain = _block_output(model, pixels)
    for tokens, changed in (("cls", [0]), ("patches", list(range(1, 65))), ([5, -1], [5, 64])):
        with steered(model, BLOCK, sae, {11: 5.0}, tokens=tokens):
            after = _block_output(model, pixels)
        moved = (after != plain).any(-1).any(0).nonzero().flatten().tolist()
        assert moved == changed, tokens


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu"])
def test_per_row_edits_equal_rows_one_by_one(clip, architecture):
    model, pixels = clip
    sae = _sae(architecture)
    if architecture == "batchtopk":
        sae.threshold.fill_(0.05)  # a trained threshold; inference selects per row with it
    rows = [{3: 2.0}, {}, {3: Edit("scale", 0.0), 40: 1.0}, {100: Edit("add", -0.5)}, {}, {7: 9.0}]
    for mode in ("delta", "reconstruction"):
        with steered(model, BLOCK, sae, rows, mode=mode):
            together = model.encode_image(pixels)
        for b, edits in enumerate(rows):
            with steered(model, BLOCK, sae, edits, mode=mode):
                alone = model.encode_image(pixels[b : b + 1])
            torch.testing.assert_close(together[b : b + 1], alone, rtol=1e-5, atol=1e-6)


def test_hooks_are_removed_after_the_block_and_after_an_exception(clip):
    model, pixels = clip
    module = model.get_submodule(BLOCK)
    sae = _sae()
    sae.train()
    with steered(model, BLOCK, sae, {1: 1.0}):
        assert len(module._forward_hooks) == 1 and not sae.training
    assert not module._forward_hooks and sae.training
    with pytest.raises(RuntimeError, match="boom"), steered(model, BLOCK, sae, {1: 1.0}):
        raise RuntimeError("boom")
    assert not module._forward_hooks
    with pytest.raises(ValueError, match="2 per-row edit maps for a batch of 6"):  # noqa: SIM117
        with steered(model, BLOCK, sae, [{1: 1.0}, {}]):  # fails inside the forward, in the block
            model.encode_image(pixels)
    assert not module._forward_hooks


def test_bad_steering_requests_fail_clearly(clip):
    model, _ = clip
    sae = _sae()
    with pytest.raises(ValueError, match=r"edited latents \[999\]"), steered(model, BLOCK, sae, {999: 1.0}):
        pass
    with pytest.raises(ValueError, match="not a module"), steered(model, "visual.nope", sae, {1: 1.0}):
        pass
    with pytest.raises(ValueError, match="mode="), steered(model, BLOCK, sae, {1: 1.0}, mode="clamp"):
        pass
    with pytest.raises(ValueError, match="op 'mul'"):
        Edit("mul", 2.0)
    with pytest.raises(ValueError, match="d_in=32"), steered(model, BLOCK, _sae(d=32), {1: 1.0}):
        model.encode_image(clip[1])
