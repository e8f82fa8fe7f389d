"""Training on Ray Train: latent-sharded workers match one process, and a killed job resumes exactly."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from ray.util.state import list_actors
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.activations.reader import ActivationStream
from vlsae_ray.config import TrainConfig
from vlsae_ray.sae import SparseAutoencoder, build_sae
from vlsae_ray.train import SAETrainer
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


def test_killed_worker_or_job_resumes_to_the_weights_of_an_uninterrupted_run(ray_cluster, tmp_path):
    import ray

    root = activations(str(tmp_path / "acts"))
    options = {"num_workers": 2, "epochs": 4, "batch_size": 32, "checkpoint_every": 8}
    uninterrupted = train_config(root, str(tmp_path / "uninterrupted"), **options)
    summary = run_train(uninterrupted)
    # metrics every 10 steps and at the end, as TensorBoard scalars beside the SAE
    events = EventAccumulator(str(tmp_path / "uninterrupted" / "tensorboard"))
    events.Reload()
    fvu = events.Scalars("fvu")
    assert [e.step for e in fvu] == [*range(10, summary.steps, 10), summary.steps]
    assert fvu[-1].value == pytest.approx(summary.metrics["fvu"])

    # A worker killed midway: Ray Train restarts the workers, which resume from the last checkpoint.
    total = 4 * (SHARDS * SHARD_ROWS // 32)
    restarted = train_config(root, str(tmp_path / "restarted"), max_failures=1, **options)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        run = pool.submit(run_train, restarted)
        wait_for(storage.join(restarted.output, "checkpoints", "latest.json"), run.done)
        alive_workers = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
        workers = list_actors(address=ray_cluster, filters=alive_workers)
        os.kill(workers[-1].pid, signal.SIGKILL)
        assert not run.done()
        assert run.result(timeout=300).steps == total
    # rank 0 started a second event log after the restart; the weights are those of an unbroken run
    assert len(list((tmp_path / "restarted" / "tensorboard").glob("events.*"))) == 2
    assert_same_sae(SparseAutoencoder.load(uninterrupted.output), SparseAutoencoder.load(restarted.output))

    # The whole job killed midway and submitted again.
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
