"""`vlsae plan` against measured memory at small sizes, layout choices with known answers, the CLI.

How memory is measured: the CPU allocator reports every allocation and free, with its running total
of allocated bytes, to the profiler (`profile_memory=True`); the whole run (building the SAE, a
warm-up step that creates the gradients and Adam's state, then the measured step) happens inside the
profiler, so that total, counted from its value when profiling began, is exact for it. The bytes
held just before the measured step are the states (plus the dead-latent counters); the highest total
during the step, minus those, is the step's peak, which the plan's max(forward activations, update
temporaries) must match within TOLERANCE. The state bytes are compared exactly with numel *
element_size of the parameters, their .grad and the optimizer's state tensors.

Run as a script, this file is one rank of a 2-shard run (`sharded_peak`).
"""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

from vlsae_ray.cli import main
from vlsae_ray.sae import TopKConfig, build_sae
from vlsae_ray.train import SAETrainer
from vlsae_ray.train.parallel import LatentShardedSAE, ParallelLayout
from vlsae_ray.train.plan import S3_PUT_LIMIT, format_plan, format_save, plan

# measured peak / planned peak of one step. The AuxK term assumes every latent is dead: the runs
# below make them so (dead_tokens_threshold=0).
TOLERANCE = 0.1


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) bytes, summed over the tensors themselves."""
    params = list(module.parameters())
    state = [t for per_param in optimizer.state.values() for t in per_param.values() if torch.is_tensor(t)]
    return nbytes(params), nbytes(p.grad for p in params if p.grad is not None), nbytes(state)


def _walk(events):
    for event in events:
        yield event
        yield from _walk(event.children)


def step_peak(setup) -> tuple[int, int]:
    """(bytes held before the measured step, peak bytes above that during it), from the allocator.

    `setup()` builds everything and returns the step to measure; both run inside the profiler.
    """
    # A previous test's trainer is a reference cycle (its schedule calls its method): free it now,
    # or the collector frees it during this profile and the running total drops by its bytes.
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = setup()
        with record_function("measured_step"):
            step()
    events = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
    mark = next(e for e in events if e.name == "measured_step")
    allocations = sorted((e for e in events if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    # the allocator's running total is process-wide: count from its value when this profile began
    first = allocations[0].extra_fields
    start = first.total_allocated - first.alloc_size
    held = [e.extra_fields.total_allocated for e in allocations if e.start_time_ns < mark.start_time_ns][-1]
    during = [
        e.extra_fields.total_allocated
        for e in allocations
        if mark.start_time_ns <= e.start_time_ns <= mark.end_time_ns
    ]
    return held - start, max(during) - held


def one_process_setup(d, n_latents, k, batch, precision="fp32"):
    def setup():
        torch.manual_seed(0)
        sae = build_sae({"architecture": "topk", "d_in": d, "n_latents": n_latents, "k": k})
        trainer = SAETrainer(sae, total_steps=10, dead_tokens_threshold=0, precision=precision)
        trainer.step(torch.randn(batch, d))
        return lambda: trainer.step(torch.randn(batch, d))

    return setup


@pytest.mark.parametrize("latent_shards", [1, 4])
def test_states_are_the_bytes_of_the_worker_tensors(latent_shards):
    d, n_latents, k, batch = 24, 512, 8, 64
    config = TopKConfig(d_in=d, n_latents=n_latents, k=k)
    # this worker's real module: the whole SAE, or one shard of four (no communication needed to build it)
    layout = ParallelLayout(1, latent_shards, 0, latent_shards - 1)
    model = build_sae(config) if latent_shards == 1 else LatentShardedSAE(config, layout)
    trainer = SAETrainer(model, total_steps=10, layout=ParallelLayout())
    for p in model.parameters():  # one Adam step creates its state, as a training step would
        p.grad = torch.randn_like(p)
    trainer.optimizer.step()
    planned = plan(d, n_latents, k, batch, "fp32", latent_shards, 80).layout(1, latent_shards, 0)
    assert state_bytes(model, trainer.optimizer) == (planned.parameters, planned.gradients, planned.optimizer)


def test_bf16_states_are_the_bytes_of_the_trainers_bf16_step():
    """The trainer's bf16 keeps fp32 weights, gradients and Adam state: the plan counts them so."""
    d, n_latents, k, batch = 32, 1024, 8, 64
    torch.manual_seed(0)
    sae = build_sae({"architecture": "topk", "d_in": d, "n_latents": n_latents, "k": k})
    trainer = SAETrainer(sae, total_steps=10, precision="bf16")
    trainer.step(torch.randn(batch, d))
    planned = plan(d, n_latents, k, batch, "bf16", 1, 80).layout(1, 1, 0)
    assert state_bytes(sae, trainer.optimizer) == (planned.parameters, planned.gradients, planned.optimizer)
    assert planned.states == plan(d, n_latents, k, batch, "fp32", 1, 80).layout(1, 1, 0).states


def test_plan_precisions_are_the_trainers():
    from typing import get_args

    from vlsae_ray.config import Precision
    from vlsae_ray.train.plan import COMPUTE_BYTES

    assert tuple(COMPUTE_BYTES) == get_args(Precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    ("d", "n_latents", "k", "batch"),
    [
        (32, 4096, 8, 256),  # the [B, F] pre-activations dominate
        (256, 2048, 8, 16),  # the [F, d] update temporaries dominate
    ],
)
def test_step_peak_matches_the_plan(d, n_latents, k, batch, precision):
    held, peak = step_peak(one_process_setup(d, n_latents, k, batch, precision))
    planned = plan(d, n_latents, k, batch, precision, 1, 80).layout(1, 1, 0)
    # held: the states and the [F] int64 dead-latent counters (and a few scalars)
    assert 0 <= held - planned.states - 8 * n_latents < 1024
    estimate = max(planned.activations.total, planned.temporaries)
    assert peak == pytest.approx(estimate, rel=TOLERANCE), (peak, planned.activations, planned.temporaries)


def sharded_peak(rank: int, init_file: str, out_file: str) -> None:
    """One rank of 2 latent shards (gloo): write its held bytes and step peak to `out_file`."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    spec = json.loads(Path(out_file).with_name("spec.json").read_text())

    def setup():
        layout = ParallelLayout.create(latent_shards=2)
        model = LatentShardedSAE(TopKConfig(**spec["sae"]), layout)
        trainer = SAETrainer(model, total_steps=10, dead_tokens_threshold=0, layout=layout)
        generator = torch.Generator().manual_seed(1)  # both shards must see the same batches
        trainer.step(torch.randn(spec["batch"], spec["sae"]["d_in"], generator=generator))
        return lambda: trainer.step(torch.randn(spec["batch"], spec["sae"]["d_in"], generator=generator))

    held, peak = step_peak(setup)
    Path(out_file).write_text(json.dumps({"held": held, "peak": peak}))
    dist.destroy_process_group()


def test_sharded_worker_peak_matches_the_plan(tmp_path):
    d, n_latents, k, batch = 32, 8192, 8, 256
    (tmp_path / "spec.json").write_text(
        json.dumps({"sae": {"d_in": d, "n_latents": n_latents, "k": k}, "batch": batch})
    )
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(tmp_path / "pg"), str(tmp_path / f"rank{rank}.json")],
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    planned = plan(d, n_latents, k, batch, "fp32", 2, 80).layout(1, 2, 0)
    estimate = max(planned.activations.total, planned.temporaries)
    for measured in ranks:
        # held: the states, the [F / 2] int64 dead-latent counters, and whatever of the warm-up step's
        # collective buffers gloo's threads have not yet freed (measured 0 to 180 KB, varying run to
        # run): at most the gathered candidates and the summed reconstruction
        in_flight = planned.activations.candidates + planned.activations.reconstruction
        assert 0 <= measured["held"] - planned.states - 8 * n_latents // 2 < in_flight
        assert measured["peak"] == pytest.approx(estimate, rel=TOLERANCE), (measured, planned.activations)


def least_communication_that_fits(p):
    """Brute force over the candidates: the fitting one that sends least (ties: more data parallelism)."""
    fitting = [c for c in p.layouts if c.peak <= p.usable_bytes]
    return min(fitting, key=lambda c: (c.comm.total, -c.data_parallel, c.zero_stage), default=None)


def test_small_sae_fits_replicated_so_pure_data_parallel():
    # 2M parameters: their gradient all-reduce is cheaper than gathering 8192 samples' candidates
    p = plan(256, 4096, 32, 8192, "fp32", 8, 80)
    assert (p.chosen.data_parallel, p.chosen.latent_shards, p.chosen.zero_stage) == (8, 1, 0)
    assert p.chosen == least_communication_that_fits(p)
    n = 2 * 4096 * 256 + 4096 + 256
    assert p.chosen.comm.candidates == 0 and p.chosen.comm.gradients == 2 * 7 * n * 4 // 8


def test_too_wide_for_one_gpu_is_sharded():
    # 4M latents x 1024 in fp32: 32 GiB of weights, as much of gradients and 64 GiB of Adam moments
    p = plan(1024, 2**22, 64, 4096, "fp32", 8, 80, zero_stage=0)
    assert p.layout(8, 1).parameters == 2 * 2**22 * 1024 * 4 + (2**22 + 1024) * 4
    assert not p.layout(8, 1).fits and not p.layout(4, 2).fits
    assert (p.chosen.data_parallel, p.chosen.latent_shards) == (1, 8)
    assert p.chosen == least_communication_that_fits(p)


def test_zero_makes_a_layout_fit_by_partitioning_optimizer_state():
    p = plan(1024, 2**21, 64, 4096, "bf16", 8, 80)
    zero0, zero1 = p.layout(8, 1, 0), p.layout(8, 1, 1)
    assert not zero0.fits and zero1.fits
    # fp32 moments (8 bytes per parameter); ZeRO 1 partitions them over 8 with its fp32 master copy
    n = 2 * 2**21 * 1024 + 2**21 + 1024
    assert zero0.optimizer == 8 * n + 16 and zero1.optimizer == 12 * math.ceil(n / 8) + 4
    with pytest.raises(KeyError):  # the trainer runs ZeRO without latent shards only
        p.layout(4, 2, 1)
    assert zero1.comm == zero0.comm  # reduce-scatter + all-gather: the all-reduce's volume


def test_impossible_run_says_none_fits_and_why():
    p = plan(4096, 2**26, 64, 4096, "fp32", 2, 24)
    assert p.chosen is None and least_communication_that_fits(p) is None
    assert "no layout fits in 21.6 GiB usable of 24 GiB per GPU" in p.reason
    # parameters 1024 GiB + gradients 1024 + Adam 2048 + the decoder-gradient projection 1024 + activations
    assert "the leanest, 1 x 2 with ZeRO 0, needs 5121.7 GiB" in p.reason and "use more GPUs" in p.reason
    assert "chosen: none" in format_plan(p)


def test_layouts_that_do_not_divide_the_latents_are_skipped_with_the_reason():
    p = plan(64, 1000, 8, 96, "fp32", 6, 80)
    assert {(c.data_parallel, c.latent_shards) for c in p.layouts} == {(6, 1), (3, 2)}
    assert any("n_latents=1000 is not divisible by 3 latent shards" in s for s in p.skipped)


def test_flops_and_communication_of_a_known_case():
    d, n_latents, k, batch = 1024, 2**24, 64, 4096
    p = plan(d, n_latents, k, batch, "bf16", 64, 80)
    assert p.aux_k == TopKConfig(d_in=d, n_latents=n_latents, k=k).aux_k_latents == 512
    assert p.flops.encoder == 2 * 4096 * 1024 * 2**24  # 1.44e14: the encoder GEMM
    assert p.flops.total == 2 * batch * d * (n_latents + k + 512) + 8 * batch * (k + 512) * d
    c = p.layout(2, 32, 0)
    # per worker: 2048 samples; 31 x (2048 x (64 + 512) candidates x 10 bytes) sent in the all-gathers,
    # (bf16 values), 3 ring all-reduces of a fp32 [2048, 1024] over 32, one of 2^19 x 2049 + 1024 fp32
    # gradients over 2
    assert c.comm.candidates == 31 * 2048 * 576 * 10
    assert c.comm.reconstruction == 3 * (2 * 31 * 2048 * 1024 * 4 // 32)
    assert c.comm.gradients == (2**19 * 2049 + 1024) * 4
    assert c.flops_per_worker == p.flops.total / 64


def test_save_of_16m_latents_is_sharded_in_parts_and_flags_the_single_put_limit():
    p = plan(1024, 2**24, 64, 4096, "fp32", 64, 80, part_size=64 * 2**20)
    save = p.chosen.save
    assert p.chosen.latent_shards == 64
    n = 2 * 2**18 * 1024 + 2**18 + 1024  # one shard's parameters, as `parameters` counts them
    assert save.bytes_per_rank == p.chosen.parameters == 4 * n
    assert (save.files, save.objects) == (64, 66)
    assert save.parts_per_file == math.ceil(4 * n / 2**26) == 33
    assert save.extra_memory == 3 * 2**26 < save.bytes_per_rank / 10
    assert save.whole_bytes == 4 * (2 * 2**24 * 1024 + 2**24 + 1024) > S3_PUT_LIMIT
    text = format_plan(p)
    assert "save: 66 objects (64 shard files, an index and config.json)" in text
    assert "writes 2.00 GiB in 33 part(s) of 64 MiB" in text
    assert "the whole SAE is 128.06 GiB: one file in one PUT would exceed S3's 5 GiB limit" in text


def test_small_save_is_one_file_in_one_put():
    p = plan(256, 4096, 32, 8192, "fp32", 8, 80, part_size=64 * 2**20)
    save = p.chosen.save
    assert (save.files, save.objects, save.parts_per_file) == (1, 2, 1)
    assert not save.single_put_too_large and "PUT" not in format_plan(p)


def test_a_file_over_10000_parts_names_the_part_size_to_set():
    save = plan(1024, 2**24, 64, 4096, "fp32", 1, 2000, part_size=5 * 2**20).layout(1, 1).save
    assert save.parts_per_file == math.ceil(save.whole_bytes / (5 * 2**20)) > 10_000
    assert any("set VLSAE_S3_PART_SIZE to at least 14 MiB" in line for line in format_save(save))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "fp16"}, "precision='fp16' is not a training precision: use one of fp32, tf32, bf16"),
        ({"k": 5000}, "k=5000 must be at most n_latents=4096"),
        ({"zero_stage": 3}, "zero_stage=3 must be one of (0, 1, 2)"),
        ({"n_gpus": 0}, "n_gpus=0 must be a positive integer"),
    ],
)
def test_bad_input_names_the_value(kwargs, message):
    args = {"d": 64, "n_latents": 4096, "k": 8, "batch_size": 64, "precision": "fp32", "n_gpus": 1} | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(**args, gpu_memory_gb=80)


def test_cli_prints_the_table_and_the_choice(capsys):
    argv = (
        "plan --d 1024 --latents 16777216 --k 64 --batch 4096 --precision bf16 --gpus 64 --gpu-memory-gb 80"
    )
    assert main(argv.split()) == 0
    out = capsys.readouterr().out
    expected = plan(1024, 2**24, 64, 4096, "bf16", 64, 80)
    assert out.strip() == format_plan(expected)
    assert f"chosen: {expected.chosen.name} with ZeRO {expected.chosen.zero_stage}" in out
    assert "precision bf16;" in out.splitlines()[0]  # as training.precision spells it
    assert any(line.split()[-3] == "yes" for line in out.splitlines() if " x " in line[:8])


def test_cli_bad_precision_exits_2_naming_it(capsys):
    argv = "plan --d 64 --latents 512 --k 8 --batch 64 --precision fp16 --gpus 1 --gpu-memory-gb 8"
    assert main(argv.split()) == 2
    assert "precision='fp16' is not a training precision" in capsys.readouterr().err


if __name__ == "__main__":
    sharded_peak(int(sys.argv[1]), sys.argv[2], sys.argv[3])
