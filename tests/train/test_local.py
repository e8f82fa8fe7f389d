import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

from vlsae_ray.sae import build_sae
from vlsae_ray.sae.topk import topk_relu
from vlsae_ray.train import SAETrainer, fit_local

TOPK = {"architecture": "topk", "d_in": 16, "n_latents": 64, "k": 4}


@pytest.fixture
def one_thread():
    """Small matrices train faster on one thread, and the test machine's 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted(n, d, n_features, active, noise, seed):
    """Sums of `active` random unit-norm features with coefficients in [0.5, 1.5], an offset, noise."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features /= features.norm(dim=-1, keepdim=True)
    support = torch.rand(n, n_features, generator=g).argsort(-1)[:, :active]
    coefficients = torch.zeros(n, n_features).scatter(1, support, 0.5 + torch.rand(n, active, generator=g))
    offset = 3.0
    x = coefficients @ features + offset + noise * torch.randn(n, d, generator=g)
    return x, features, offset


def fvu(x, x_hat):
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_topk_recovers_planted_features(one_thread):
    torch.manual_seed(0)
    x, features, offset = planted(8192, 64, 256, active=4, noise=0.01, seed=0)
    sae = build_sae({"architecture": "topk", "d_in": 64, "n_latents": 512, "k": 4})
    metrics = fit_local(sae, x, batch_size=256, epochs=15, seed=0, lr=2e-3)
    assert metrics["steps"] == 15 * 32 and metrics["samples"] == 15 * 8192

    with torch.no_grad():
        x_hat, z, _ = sae.eval()(x)
    # Reference: the true dictionary as a tied TopK encoder/decoder. Its error is the interference
    # between non-orthogonal features (cosines ~ 1/sqrt(64)), far above the noise floor (~0.15%),
    # and a learned encoder should halve it.
    oracle = fvu(x, topk_relu((x - offset) @ features.T, 4) @ features + offset)
    assert oracle > 0.1
    assert fvu(x, x_hat) < 0.5 * oracle
    best_cosine = (features @ sae.W_dec_fd.detach().T).max(-1).values
    assert (best_cosine > 0.9).float().mean() >= 0.9
    assert ((z > 0).sum(-1) <= 4).all()


def test_relu_l1_coefficient_trades_reconstruction_for_sparsity(one_thread):
    x, _, _ = planted(2048, 16, 32, active=2, noise=0.01, seed=1)
    runs = {}
    for l1_coefficient in (0.003, 0.03):
        torch.manual_seed(0)
        sae = build_sae(
            {"architecture": "relu", "d_in": 16, "n_latents": 64, "l1_coefficient": l1_coefficient}
        )
        runs[l1_coefficient] = fit_local(sae, x, batch_size=128, epochs=10, seed=0, lr=1e-2)
    assert {"loss", "fvu", "l0", "dead_fraction", "lr", "mse", "l1", "steps", "samples"} == set(runs[0.003])
    assert runs[0.003]["fvu"] < 0.1
    assert runs[0.03]["l0"] < runs[0.003]["l0"] < 32  # half the latents would be a dense code
    assert runs[0.03]["fvu"] > runs[0.003]["fvu"]


def test_fit_local_is_reproducible_from_its_seed(one_thread):
    x, _, _ = planted(512, 16, 32, active=2, noise=0.01, seed=2)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(0)
        sae = build_sae(TOPK)
        runs.append((fit_local(sae, x, batch_size=64, epochs=2, seed=seed), sae.W_dec_fd.detach().clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])


def test_lr_schedule_warms_up_holds_then_decays_to_zero():
    sae = build_sae(TOPK)
    trainer = SAETrainer(sae, total_steps=100, warmup_steps=10)
    # Gao et al.'s width rule, raised by sqrt(2^15 / T) for a run of T < 2^15 steps
    assert trainer.lr == pytest.approx(2e-4 / math.sqrt(64 / 2**14) * math.sqrt(2**15 / 100))
    for long_run in (2**15, 2**17):  # long runs keep Gao et al.'s rate
        assert SAETrainer(sae, total_steps=long_run).lr == pytest.approx(2e-4 / math.sqrt(64 / 2**14))
    factors = [trainer.lr_factor(step) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert factors[10:80] == [1.0] * 70
    assert factors[80] == 1.0 and factors[90] == pytest.approx(0.5) and factors[99] == pytest.approx(0.05)
    assert trainer.lr_factor(100) == 0.0
    lrs = [trainer.step(torch.randn(8, 16))["lr"] for _ in range(12)]
    assert lrs[0] == pytest.approx(0.1 * trainer.lr) and lrs[11] == pytest.approx(trainer.lr)


def test_step_keeps_unit_decoder_and_reports_batch_metrics():
    torch.manual_seed(0)
    sae = build_sae(TOPK)
    x = 5.0 * torch.randn(256, 16)
    trainer = SAETrainer(sae, total_steps=20, sample=x, lr=1e-2)
    for _ in range(5):
        metrics = trainer.step(x[:32])
        torch.testing.assert_close(sae.W_dec_fd.norm(dim=-1), torch.ones(64))
    assert metrics["l0"] == 4.0
    assert metrics["loss"] == pytest.approx(metrics["mse"] + metrics.get("auxk", 0.0))
    snapshot = {name: t.clone() for name, t in sae.state_dict().items()}
    with torch.no_grad():
        x_hat, _, _ = sae(x[:32])
    assert fvu(x[:32], x_hat) < 1.0
    # The metric describes the batch before the update; recompute it from the pre-step weights.
    before = trainer.step(x[32:64])
    sae.load_state_dict(snapshot)
    with torch.no_grad():
        x_hat, _, _ = sae(x[32:64])
    assert before["fvu"] == pytest.approx(fvu(x[32:64], x_hat), rel=1e-5)


def test_dead_latents_are_counted_and_trained_by_auxk():
    torch.manual_seed(0)
    sae = build_sae(TOPK)
    with torch.no_grad():
        sae.b_enc_f[:32] = -100.0  # half the latents can never win the top-k
    trainer = SAETrainer(sae, total_steps=100, dead_tokens_threshold=64)
    x = torch.randn(32, 16)
    first, second, third = (trainer.step(x) for _ in range(3))
    assert first["dead_fraction"] == 0.0 and "auxk" not in first  # 32 samples seen < 64
    assert second["dead_fraction"] >= 0.5 and "auxk" not in second  # the mask used was from before
    assert "auxk" in third and third["loss"] == pytest.approx(third["mse"] + third["auxk"])
    assert trainer.dead_mask()[:32].all()


def test_default_dead_threshold_is_a_tenth_of_the_run():
    trainer = SAETrainer(build_sae(TOPK), total_steps=50)
    trainer.step(torch.randn(8, 16))
    assert trainer.dead_tokens_threshold == 40


def test_resume_from_state_dict_continues_identically():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    sae = build_sae(TOPK)
    trainer = SAETrainer(sae, total_steps=10, sample=x, dead_tokens_threshold=16)
    for _ in range(3):
        trainer.step(x[:16])
    weights, state = copy.deepcopy(sae.state_dict()), copy.deepcopy(trainer.state_dict())
    expected = [trainer.step(x[16:32]) for _ in range(3)]

    resumed = build_sae(TOPK)
    resumed.load_state_dict(weights)
    trainer = SAETrainer(resumed, total_steps=10)
    trainer.load_state_dict(state)
    assert [trainer.step(x[16:32]) for _ in range(3)] == expected


def test_trainer_drives_a_ddp_wrapped_sae_like_the_plain_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    x = 3.0 * torch.randn(128, 16)
    torch.manual_seed(0)
    plain = build_sae(TOPK)
    torch.manual_seed(0)
    wrapped = build_sae(TOPK)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(wrapped)
        trainers = [SAETrainer(m, total_steps=10, sample=x, dead_tokens_threshold=32) for m in (plain, ddp)]
        for start in range(0, 128, 32):
            a, b = (t.step(x[start : start + 32]) for t in trainers)
            assert a == pytest.approx(b, rel=1e-5)
    finally:
        dist.destroy_process_group()
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(wrapped.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"


@pytest.mark.parametrize(("architecture", "epochs"), [("topk", 15), ("batchtopk", 25)])
def test_power_law_planted_features_are_recovered(one_thread, architecture, epochs):
    from vlsae_ray.sae.synthetic import planted_features, recovered_fraction

    data = planted_features(8192, 64, 256, active=4, alpha=0.3, noise_fvu=0.02, seed=3)
    assert data.frequencies_m[0] > 3 * data.frequencies_m[-1]  # a power law, not uniform
    torch.manual_seed(0)
    sae = build_sae({"architecture": architecture, "d_in": 64, "n_latents": 512, "k": 4})
    fit_local(sae, data.x_nd, batch_size=256, epochs=epochs, seed=0, lr=5e-3)
    assert recovered_fraction(data.features_md, sae.W_dec_fd.detach()) >= 0.9
    with torch.no_grad():
        x_hat, z, _ = sae.eval()(data.x_nd)
    assert fvu(data.x_nd, x_hat) < 0.2
    # BatchTopK infers with its learned threshold, without the batch: L0 stays close to k.
    l0 = float((z > 0).sum(-1).float().mean())
    assert 3.2 <= l0 <= 4.8


def test_batchtopk_threshold_gives_an_eval_l0_near_k_after_a_short_run(one_thread):
    """32 steps: a fixed 0.99 momentum kept θ near the early, large cutoffs (eval L0 0.1 here)."""
    from vlsae_ray.sae.synthetic import planted_features

    data = planted_features(4096, 64, 256, active=4, alpha=0.3, noise_fvu=0.02, seed=3)
    torch.manual_seed(0)
    sae = build_sae({"architecture": "batchtopk", "d_in": 64, "n_latents": 512, "k": 4})
    fit_local(sae, data.x_nd, batch_size=256, epochs=2, seed=0, lr=5e-3)
    with torch.no_grad():
        z = sae.eval().encode(data.x_nd)
    assert 3.0 <= float((z > 0).sum(-1).float().mean()) <= 5.0


class OpDtypes(TorchDispatchMode):
    """Records (aten op, dtypes of its tensor arguments, dtype of its first output) of every op run."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, tuple) else out
        dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else None
        self.calls.append((func.overloadpacket.__name__, dtypes, getattr(first, "dtype", None), shape))
        return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_runs_the_encoder_gemm_and_decode_in_bf16_on_fp32_master_weights(precision):
    torch.manual_seed(0)
    x = 3.0 * torch.randn(256, 16) + 1.0
    sae = build_sae(TOPK)
    trainer = SAETrainer(sae, total_steps=10, sample=x, dead_tokens_threshold=32, precision=precision)
    trainer.step(x[:32])  # the latents that did not fire are dead now: the next step runs AuxK too
    with OpDtypes() as ops:
        metrics = trainer.step(x[32:64])
    assert "auxk" in metrics and all(isinstance(v, float) for v in metrics.values())
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    # the encoder GEMM: [32, 64] pre-activations from the (cast) weights
    gemms = [c for c in ops.calls if c[0] == "addmm" and c[3] == (32, 64)]
    assert gemms and all(c[1][1:] == (compute, compute) and c[2] == compute for c in gemms)
    # the sparse decode (main and AuxK) in the forward: bf16 rows of W_dec [64, 16] and bf16 weights
    decodes = [c for c in ops.calls if c[0].startswith("_embedding_bag") and c[1][0] == compute]
    assert len(decodes) >= 2
    if precision == "fp32":  # the default never leaves fp32
        assert not any(torch.bfloat16 in c[1] or c[2] == torch.bfloat16 for c in ops.calls)
    # fp32 master weights, gradients and Adam state
    for p in sae.parameters():
        assert p.dtype == p.grad.dtype == torch.float32
        assert all(
            t.dtype == torch.float32 for t in trainer.optimizer.state[p].values() if t.is_floating_point()
        )


def test_fp32_is_the_default_bit_for_bit_and_bf16_is_another_run(one_thread):
    x, _, _ = planted(1024, 16, 32, active=2, noise=0.01, seed=2)
    runs = []
    for options in ({}, {"precision": "fp32"}, {"precision": "bf16"}):
        torch.manual_seed(0)
        sae = build_sae(TOPK)
        runs.append((fit_local(sae, x, batch_size=64, epochs=2, seed=0, **options), sae.state_dict()))
    (default, default_state), (fp32, fp32_state), (bf16, bf16_state) = runs
    assert default == fp32 and all(torch.equal(default_state[n], t) for n, t in fp32_state.items())
    assert bf16 != fp32 and not torch.equal(bf16_state["W_dec_fd"], fp32_state["W_dec_fd"])


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu", "vl_sae"])
def test_bf16_training_reaches_the_fp32_fvu(one_thread, architecture):
    from vlsae_ray.sae.synthetic import planted_features

    data = planted_features(4096, 32, 64, active=3, alpha=0.3, noise_fvu=0.02, seed=4)
    config = {"architecture": architecture, "d_in": 32, "n_latents": 256, "k": 4}
    if architecture == "jumprelu":
        config = {"architecture": architecture, "d_in": 32, "n_latents": 256}
    fvus = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        sae = build_sae(config)
        fit_local(sae, data.x_nd, batch_size=256, epochs=4, seed=0, lr=5e-3, precision=precision)
        with torch.no_grad():
            x_hat, _, _ = sae.eval()(data.x_nd)  # evaluated in fp32
        fvus[precision] = fvu(data.x_nd, x_hat)
    assert fvus["fp32"] < 0.6  # it learned (VL-SAE's distance latents learn slowest here)
    assert fvus["bf16"] == pytest.approx(fvus["fp32"], rel=0.05, abs=0.01), fvus


def test_tf32_and_autocast_hold_inside_the_step_only():
    sae = build_sae(TOPK)
    seen = []
    sae.register_forward_pre_hook(
        lambda *_: seen.append((torch.get_float32_matmul_precision(), torch.is_autocast_enabled("cpu")))
    )
    x = torch.randn(8, 16)
    previous = torch.get_float32_matmul_precision()
    try:
        for outside in ("highest", "high"):
            torch.set_float32_matmul_precision(outside)
            for precision in ("fp32", "tf32", "bf16"):
                SAETrainer(sae, total_steps=4, precision=precision).step(x)
                assert torch.get_float32_matmul_precision() == outside  # put back after the step
                assert not torch.is_autocast_enabled("cpu")
    finally:
        torch.set_float32_matmul_precision(previous)
    inside = [("highest", False), ("high", False), ("highest", True)]
    assert seen == inside * 2  # from the config, whatever the process had set


def test_unknown_precision_is_refused_naming_it():
    from pydantic import ValidationError

    from vlsae_ray.config import TrainingConfig

    with pytest.raises(ValueError, match="precision='fp16' is not one of fp32, tf32, bf16"):
        SAETrainer(build_sae(TOPK), total_steps=1, precision="fp16")
    with pytest.raises(ValidationError, match="precision"):
        TrainingConfig(precision="fp16")
