"""Training on Ray Train: latent-sharded workers match one process, and a killed job resumes exactly."""

import concurrent.futures
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch
import yaml
from ray.util.state import list_actors
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.activations.reader import ActivationStream
from vlsae_ray.config import TrainConfig
from vlsae_ray.sae import SparseAutoencoder, build_sae
from vlsae_ray.train import SAETrainer, checkpoint
from vlsae_ray.train.parallel import LatentShardedSAE, ParallelLayout
from vlsae_ray.train.ray_train import INIT_SAMPLES, _init_sample, run_train

pytestmark = pytest.mark.slow
D, SHARDS, SHARD_ROWS = 16, 8, 128


def activations(root):
    """Sparse sums of 32 directions plus an offset, in 8 committed shards."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(32, D, generator=g)
    shards = []
    for _ in range(SHARDS):
        codes = torch.rand(SHARD_ROWS, 32, generator=g) * (torch.rand(SHARD_ROWS, 32, generator=g) < 0.1)
        shards.append(codes @ directions + 1.0)
    store.write_dataset(root, shards)
    return root


def train_config(root, output, **training):
    return TrainConfig.model_validate(
        {
            "activations": root,
            "sae": {"architecture": "topk", "d_in": D, "n_latents": 256, "k": 4},
            "training": {"batch_size": 64, "epochs": 2, "lr": 1e-3, **training},
            "output": output,
        }
    )


def assert_same_sae(a: SparseAutoencoder, b: SparseAutoencoder):
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)


def test_latent_sharded_sweep_equals_one_process_per_sae(ray_cluster, s3_root):
    root = activations(storage.join(s3_root, "acts"))  # read from and written to the S3 server
    config = train_config(root, storage.join(s3_root, "sae"), num_workers=2, latent_shards=2)
    config = config.model_copy(update={"sweep": [{}, {"architecture": "batchtopk", "k": 8}]})
    summary = run_train(config)

    stream = ActivationStream(root, batch_size=64, seed=config.training.seed, window_shards=4)
    epochs = range(config.training.epochs)
    for i, (output, sae_config) in enumerate(config.sae_runs()):
        # One process on the full SAE whose halves are the shards' initial weights, on the same batches.
        seed = config.training.seed
        shards = [LatentShardedSAE(sae_config, ParallelLayout(1, 2, 0, s), seed=seed) for s in range(2)]
        full = build_sae(sae_config)
        full.load_state_dict(
            {
                name: torch.cat([shard.local.state_dict()[name] for shard in shards])
                if name in ("W_enc_fd", "b_enc_f", "W_dec_fd") else tensor
                for name, tensor in full.state_dict().items()
            }
        )
        trainer = SAETrainer(
            full, total_steps=sum(stream.steps_in_epoch(e) for e in epochs), lr=1e-3,
            sample=_init_sample(root, INIT_SAMPLES, seed),
        )
        metrics = [trainer.step(x) for e in epochs for x in stream.epoch(e)]
        assert summary.steps == trainer.steps == 2 * (SHARDS * SHARD_ROWS // 64)
        assert any("auxk" in m for m in metrics)  # dead latents were trained across the shards
        assert summary.metrics[f"sweep-{i:02d}/loss"] == pytest.approx(metrics[-1]["loss"], rel=1e-4)
        saved = build_sae(sae_config)  # as `save` writes it: the input scale folded into the biases
        saved.load_state_dict(full.folded_state_dict())
        assert_same_sae(saved, SparseAutoencoder.load(output))


def wait_for(uri: str, finished) -> None:
    """Until the object at `uri` exists (or the run is over, or 4 minutes have passed)."""
    deadline = time.monotonic() + 240
    while not storage.exists(uri) and not finished() and time.monotonic() < deadline:
        time.sleep(0.05)


def kill_a_worker(ray_cluster: str) -> None:
    alive_workers = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    workers = list_actors(address=ray_cluster, filters=alive_workers)
    os.kill(workers[-1].pid, signal.SIGKILL)


def test_killed_worker_or_job_resumes_to_the_weights_of_an_uninterrupted_run(ray_cluster, s3_root, tmp_path):
    """DeepSpeed ZeRO-2 and DDP runs resume to the weights of an uninterrupted ZeRO-2 run.

    ZeRO and DDP give the same weights (test_parallel.py), so one reference serves both.
    """
    import ray

    root = activations(str(tmp_path / "acts"))
    options = {"num_workers": 2, "epochs": 4, "batch_size": 32, "checkpoint_every": 8}
    uninterrupted = train_config(root, str(tmp_path / "uninterrupted"), zero_stage=2, **options)
    summary = run_train(uninterrupted)
    # metrics every 10 steps and at the end, as TensorBoard scalars beside the SAE
    events = EventAccumulator(str(tmp_path / "uninterrupted" / "tensorboard"))
    events.Reload()
    fvu = events.Scalars("fvu")
    assert [e.step for e in fvu] == [*range(10, summary.steps, 10), summary.steps]
    assert fvu[-1].value == pytest.approx(summary.metrics["fvu"])

    # A worker killed midway: Ray Train restarts the workers, which resume from the last checkpoint,
    # here on S3, each from its own partition of Adam's state and the fp32 master weights.
    total = 4 * (SHARDS * SHARD_ROWS // 32)
    zero_options = {**options, "checkpoint_every": 12, "zero_stage": 2, "max_failures": 1}
    zero = train_config(root, storage.join(s3_root, "zero"), **zero_options)
    checkpoints = storage.join(zero.output, "checkpoints")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        run = pool.submit(run_train, zero)
        wait_for(storage.join(checkpoints, "latest.json"), run.done)
        kill_a_worker(ray_cluster)
        assert not run.done()
        assert run.result(timeout=300).steps == total
    assert_same_sae(SparseAutoencoder.load(uninterrupted.output), SparseAutoencoder.load(zero.output))
    # Rank 0 started a second event log after the restart, at a checkpoint (step 12 or later), not
    # at the start: its first step is past 12, where a fresh start would report step 10.
    bucket, prefix = storage.join(zero.output, "tensorboard").removeprefix("s3://").split("/", 1)
    listing = storage.s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    logs = sorted(item["Key"] for item in listing)
    assert len(logs) == 2
    second_log = tmp_path / logs[1].rsplit("/", 1)[-1]
    second_log.write_bytes(storage.read_bytes(f"s3://{bucket}/{logs[1]}"))
    events = EventAccumulator(str(second_log))
    events.Reload()
    assert events.Scalars("fvu")[0].step > 12
    # Each rank's trainer.pt holds its half of the fp32 master weights; together they are the SAE's.
    info = json.loads(storage.read_text(storage.join(checkpoints, "latest.json")))
    assert info["zero_stage"] == 2
    folder = storage.join(checkpoints, f"step-{info['step']:09d}")
    weights = safetensors.torch.load(storage.read_bytes(storage.join(folder, "rank-0000.safetensors")))
    halves = [
        torch.load(
            io.BytesIO(storage.read_bytes(storage.join(folder, f"rank-{r:04d}.trainer.pt"))),
            weights_only=False,
        )["optimizer"]["single_partition_of_fp32_groups"][0]
        for r in range(2)
    ]
    flat = torch.cat([weights[name].flatten() for name, _ in build_sae(zero.sae).named_parameters()])
    assert halves[0].numel() == halves[1].numel() == flat.numel() // 2
    torch.testing.assert_close(torch.cat(halves), flat, rtol=0, atol=0)
    # its optimiser state is ZeRO-2 partitions: a run without ZeRO refuses it
    ddp_trainer = SAETrainer(build_sae(zero.sae), total_steps=total)
    with pytest.raises(ValueError, match="written with zero_stage 2, but this run has None"):
        checkpoint.restore(zero.output, ddp_trainer, ParallelLayout(2, 1, 0, 0))

    # A DDP job killed midway and submitted again.
    config = train_config(root, str(tmp_path / "killed"), **options)
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    job = subprocess.Popen(
        [sys.executable, "-m", "vlsae_ray.cli", "train", "-c", str(config_file)],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    latest = storage.join(config.output, "checkpoints", "latest.json")
    wait_for(latest, lambda: job.poll() is not None)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and its Ray Train run, midway
    job.wait()
    killed_at = json.loads(storage.read_text(latest))["step"]
    assert 0 < killed_at < total and not storage.exists(storage.join(config.output, "sae.safetensors"))

    resumed = run_train(config)  # the job resubmitted: it goes on from the checkpoint
    assert resumed.steps == total
    assert resumed.samples_per_second > 0
    assert_same_sae(SparseAutoencoder.load(uninterrupted.output), SparseAutoencoder.load(config.output))
    kept = json.loads(storage.read_text(latest))["kept"]
    assert kept == [total - 8, total]  # older checkpoints are deleted, each rank's two files
    assert len(list((tmp_path / "killed" / "checkpoints").glob("step-*/rank-*"))) == 2 * 2 * 2


def test_bf16_training_through_ray_train_is_the_one_process_bf16_step(ray_cluster, tmp_path):
    """`training.precision: bf16` reaches the worker's trainer: its SAE is one process's bf16 run."""
    root = activations(str(tmp_path / "acts"))
    config = train_config(root, str(tmp_path / "sae"), num_workers=1, epochs=1, precision="bf16")
    summary = run_train(config)

    stream = ActivationStream(root, batch_size=64, seed=config.training.seed, window_shards=4)
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker, whose 0.5 CPU gives it one thread
    for precision in ("bf16", "fp32"):
        torch.manual_seed(config.training.seed)  # as the worker builds its SAE
        sae = build_sae(config.sae)
        trainer = SAETrainer(
            sae, total_steps=stream.steps_in_epoch(0), lr=1e-3, precision=precision,
            sample=_init_sample(root, INIT_SAMPLES, config.training.seed),
        )
        metrics = [trainer.step(x) for x in stream.epoch(0)]
        saved = build_sae(config.sae)
        saved.load_state_dict(sae.folded_state_dict())
        runs[precision] = (metrics[-1], saved)
    torch.set_num_threads(threads)
    assert summary.metrics["loss"] == pytest.approx(runs["bf16"][0]["loss"], rel=1e-5)
    trained = SparseAutoencoder.load(config.output)
    assert all(t.dtype == torch.float32 for t in trained.state_dict().values() if t.is_floating_point())
    assert_same_sae(runs["bf16"][1], trained)
    assert summary.metrics["loss"] != pytest.approx(runs["fp32"][0]["loss"], rel=1e-5)  # not fp32's run
