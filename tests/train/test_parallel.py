"""Latent-sharded (and data-parallel) training gives what one process gives, on real gloo process groups.

Each rank runs tests/train/sharded_worker.py in its own process; the reference is `SAETrainer`
on the full SAE in this process, on the same global batches, with the AuxK loss on.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlsae_ray.sae import build_sae
from vlsae_ray.train import SAETrainer

WORKER = Path(__file__).with_name("sharded_worker.py")
SAE = {"d_in": 16, "n_latents": 64, "k": 4}
STEPS, BATCH = 6, 64
# Fixed, not the default rule: that gives 6 steps a rate of 0.24, which turns float rounding
# differences between the shards' sums and one process's into differences past the tolerances.
LR = 3e-3


def run_ranks(tmp_path, world, latent_shards, spec, x):
    (tmp_path / "out").mkdir()
    torch.save(x, tmp_path / "out" / "x.pt")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(world),
                str(rank),
                str(latent_shards),
                str(tmp_path / "pg"),
                str(tmp_path / "out"),
                json.dumps(spec),
            ],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "LOCAL_RANK": str(rank)},
        )
        for rank in range(world)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    return [torch.load(tmp_path / "out" / f"rank{r}.pt") for r in range(world)]


def reference(x, spec):
    torch.manual_seed(0)
    sae = build_sae(spec["sae"])
    trainer = SAETrainer(
        sae, total_steps=spec["steps"], lr=spec["lr"], sample=x[:256], dead_tokens_threshold=spec["dead"]
    )
    metrics = [trainer.step(x[s * spec["batch"] : (s + 1) * spec["batch"]]) for s in range(spec["steps"])]
    with torch.no_grad():
        z = sae.eval().encode(x[:128])
    return metrics, sae.state_dict(), z


# Latents that have not fired in one batch of 64 are dead, so AuxK trains from the second step on.
DEAD = 64


@pytest.mark.parametrize(
    ("architecture", "world", "latent_shards", "zero_stage"),
    [
        ("topk", 2, 2, None),  # 2 latent shards: AuxK across shards
        ("batchtopk", 2, 2, None),
        ("topk", 4, 4, None),
        ("topk", 4, 2, None),  # 2 data-parallel x 2 latent shards, DDP
        ("batchtopk", 2, 1, None),  # 2 data-parallel, DDP: one selection and threshold for the global batch
        ("batchtopk", 4, 2, None),  # 2 data-parallel x 2 latent shards
        ("matryoshka_batchtopk", 2, 1, None),
        ("topk", 2, 1, 1),  # DeepSpeed ZeRO-1 over 2 workers
        ("batchtopk", 2, 1, 2),  # ZeRO-2
    ],
)
def test_distributed_training_matches_one_process(tmp_path, architecture, world, latent_shards, zero_stage):
    x = 2.0 * torch.randn(STEPS * BATCH, SAE["d_in"], generator=torch.Generator().manual_seed(1)) + 1.0
    sae = {"architecture": architecture, **SAE}
    if architecture == "matryoshka_batchtopk":
        sae["group_fractions"] = [0.25, 0.75]
    spec = {"sae": sae, "steps": STEPS, "batch": BATCH, "dead": DEAD, "lr": LR, "zero_stage": zero_stage}
    expected_metrics, expected_state, expected_z = reference(x, spec)
    results = run_ranks(tmp_path, world, latent_shards, spec, x)
    parts = results[::latent_shards]  # one rank per data-parallel part
    assert any(m.get("auxk", 0) > 0 for m in expected_metrics)  # dead latents were trained
    for step, expected in enumerate(expected_metrics):
        # each data-parallel part's loss is that of its half batch (AuxK's scaled to be so, see
        # `normalized_mse`): their mean is the full batch's
        for term in ("loss", "auxk"):
            value = sum(r["metrics"][step].get(term, 0.0) for r in parts) / len(parts)
            assert value == pytest.approx(expected.get(term, 0.0), rel=1e-4)
        for result in results:
            assert result["metrics"][step]["dead_fraction"] == pytest.approx(expected["dead_fraction"])
    for result in results:  # every rank: the same weights, buffers (BatchTopK's threshold) and latents
        for name, tensor in expected_state.items():
            torch.testing.assert_close(result["state"][name], tensor, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result["z"], expected_z, rtol=1e-4, atol=1e-5)
