"""Training on Ray Train: latent-sharded workers match one process, a killed job or sweep resumes
exactly, and user mistakes (latent shards that cannot split the SAE, a resume of another run) are
refused before any worker starts."""

import concurrent.futures
import io
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vlsae_ray import cli, storage
from vlsae_ray.activations import store
from vlsae_ray.activations.reader import ActivationStream, StreamPosition
from vlsae_ray.config import TrainConfig
from vlsae_ray.sae import SparseAutoencoder, build_sae, parse_config
from vlsae_ray.train import SAETrainer, checkpoint, fit_local
from vlsae_ray.train.parallel import LatentShardedSAE, ParallelLayout
from vlsae_ray.train.ray_train import INIT_SAMPLES, TrainSummary, run_train

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


# Run in a subprocess as a job's driver: the first time a Ray worker writes a file whose URI holds
# argv[2], it is killed (SIGKILL), by a wrapper around `storage.write_bytes` that a worker setup
# hook installs in every Ray worker process; argv[3] is created as it dies, so it dies once.
KILL_ONCE = """
import os, signal, sys
import ray
from vlsae_ray.config import TrainConfig
from vlsae_ray.train.ray_train import run_train

config_json, target, marker = sys.argv[1:4]


def kill_once_at_target():
    from vlsae_ray import storage

    write_bytes = storage.write_bytes

    def write_or_die(uri, data):
        if target in uri:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        write_bytes(uri, data)

    storage.write_bytes = write_or_die


forwarded = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
env_vars = {key: os.environ[key] for key in forwarded if key in os.environ}
ray.init(runtime_env={"worker_process_setup_hook": kill_once_at_target, "env_vars": env_vars})
print(run_train(TrainConfig.model_validate_json(config_json)).model_dump_json())
"""


def test_sweep_killed_between_its_saes_checkpoints_resumes_to_one_process_per_sae(
    ray_cluster, s3_root, tmp_path, assert_same_sae
):
    """A latent-sharded sweep, one worker killed between the two SAEs' files of a checkpoint.

    The first SAE's files of step 16 are written, the second's are not: the restarted workers
    resume both from the job's last commit (step 8) and end with the weights of one process per SAE.
    """
    import ray

    root = activations(storage.join(s3_root, "acts"))  # read from and written to the S3 server
    options = {"num_workers": 2, "latent_shards": 2, "checkpoint_every": 8, "max_failures": 1}
    config = train_config(root, storage.join(s3_root, "sae"), **options)
    config = config.model_copy(update={"sweep": [{}, {"architecture": "batchtopk", "k": 8}]})
    script, marker = tmp_path / "kill_once.py", tmp_path / "killed"
    script.write_text(KILL_ONCE)
    job = subprocess.run(
        [
            sys.executable,
            str(script),
            config.model_dump_json(),
            "/sweep-01/checkpoints/step-000000016/",
            str(marker),
        ],
        env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert marker.exists()  # a worker was killed there
    summary = TrainSummary.model_validate_json(
        [line for line in job.stdout.splitlines() if line.startswith('{"output"')][-1]
    )

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
                if name in ("W_enc_fd", "b_enc_f", "W_dec_fd")
                else tensor
                for name, tensor in full.state_dict().items()
            }
        )
        trainer = SAETrainer(
            full,
            total_steps=sum(stream.steps_in_epoch(e) for e in epochs),
            lr=1e-3,
            sample=stream.init_sample(INIT_SAMPLES)[0],
        )
        metrics = [trainer.step(x) for e in epochs for x in stream.epoch(e)]
        assert summary.steps == trainer.steps == 2 * (SHARDS * SHARD_ROWS // 64)
        assert any("auxk" in m for m in metrics)  # dead latents were trained across the shards
        assert summary.metrics[f"sweep-{i:02d}/loss"] == pytest.approx(metrics[-1]["loss"], rel=1e-4)
        saved = build_sae(sae_config)  # as `save` writes it: the input scale folded into the biases
        saved.load_state_dict(full.folded_state_dict())
        assert_same_sae(saved, SparseAutoencoder.load(output))
        # only the steps the job's record keeps are left, of every rank
        steps = {uri.rsplit("/", 2)[-2] for uri in storage.list_prefix(storage.join(output, "checkpoints"))}
        assert steps == {"step-000000024", "step-000000032"}
    assert checkpoint.latest(config.output)["kept"] == [24, 32]


def launch_refused(*args, **kwargs):
    raise AssertionError("a Ray Train run was launched")


def test_resume_of_another_run_is_refused_before_launch(tmp_path, monkeypatch, capsys):
    """Ray Train's launcher is replaced by one that fails the test: refusals come before it."""
    import ray.train.torch

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", launch_refused)
    root = activations(str(tmp_path / "acts"))
    config = train_config(root, str(tmp_path / "sae"), num_workers=1)
    manifest = store.read_manifest(root)
    trainer = SAETrainer(build_sae(config.sae), total_steps=4)
    trainer.step(store.read_shard(root, manifest.shards[0])[0][:64].float())
    fields = checkpoint.run_fields(config)
    checkpoint.save(config.output, [(config.output, trainer)], StreamPosition(0, 1), fields, keep=2)
    # what moves neither the data nor the schedule may change
    free = {"checkpoint_every": 5, "keep_checkpoints": 3, "max_failures": 2, "read_tasks": 1}
    same_run = train_config(root, config.output, num_workers=1, **free)
    assert checkpoint.check_resume(config.output, checkpoint.run_fields(same_run))["step"] == 1

    changed = train_config(root, config.output, num_workers=1, batch_size=32, seed=1)
    changed = changed.model_copy(update={"sae": changed.sae.model_copy(update={"k": 8})})
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(changed.model_dump(mode="json")))
    assert cli.main(["train", "-c", str(config_file)]) == 2
    error = capsys.readouterr().err
    for change in ("training.batch_size was 64, now 32", "training.seed was 0, now 1", "sae.k was 4, now 8"):
        assert change in error
    assert "Set these back to resume it, or train into a new output" in error
    assert len(error.strip().splitlines()) == 1  # one message, no traceback


@pytest.mark.parametrize(
    ("sae", "message"),
    [
        (
            {"architecture": "relu", "d_in": D, "n_latents": 256},
            "latent sharding supports topk, batchtopk, not 'relu'",
        ),
        (
            {"architecture": "topk", "d_in": D, "n_latents": 255, "k": 4},
            "n_latents=255 must split into latent_shards=2",
        ),
        ({"architecture": "topk", "d_in": D, "n_latents": 6, "k": 4}, "equal shards of at least k=4 latents"),
    ],
)
def test_latent_sharding_that_cannot_split_the_sae_is_refused_before_launch(
    tmp_path, monkeypatch, sae, message
):
    import ray.train.torch

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", launch_refused)
    config = train_config(
        activations(str(tmp_path / "acts")), str(tmp_path / "sae"), num_workers=2, latent_shards=2
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        run_train(config.model_copy(update={"sae": parse_config(sae)}))


def test_killed_worker_or_job_resumes_to_the_weights_of_an_uninterrupted_run(
    ray_cluster, s3_root, tmp_path, assert_same_sae, wait_for, kill_a_worker
):
    """DeepSpeed ZeRO-2 and DDP runs resume to the weights of an uninterrupted run.

    ZeRO, DDP and one process on both data-parallel parts' batches give the same weights
    (test_parallel.py), so `fit_local`'s run serves as the uninterrupted one for both.
    """
    import ray

    root = activations(str(tmp_path / "acts"))
    options = {"num_workers": 2, "epochs": 4, "batch_size": 32, "checkpoint_every": 8}
    one_process = train_config(root, str(tmp_path / "uninterrupted"), **options)
    training = one_process.training
    torch.manual_seed(training.seed)  # as the workers build their SAE
    reference = build_sae(one_process.sae)
    fit_local(
        reference,
        root,
        batch_size=training.batch_size,
        epochs=training.epochs,
        seed=training.seed,
        init_samples=INIT_SAMPLES,
        parts=training.num_workers,
        lr=training.lr,
    )
    reference.save(one_process.output)
    uninterrupted = SparseAutoencoder.load(one_process.output)

    # A worker killed midway: Ray Train restarts the workers, which resume from the last checkpoint,
    # here on S3, each from its own partition of Adam's state and the fp32 master weights.
    total = 4 * (SHARDS * SHARD_ROWS // 32)
    zero_options = {**options, "checkpoint_every": 12, "zero_stage": 2, "max_failures": 1}
    zero = train_config(root, storage.join(s3_root, "zero"), **zero_options)
    checkpoints = storage.join(zero.output, "checkpoints")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        run = pool.submit(run_train, zero)
        # the first checkpoint is committed and rank 0's event log copied (right after the commit)
        wait_for(lambda: storage.list_prefix(storage.join(zero.output, "tensorboard")), run.done)
        kill_a_worker(ray_cluster)
        assert not run.done()
        assert run.result(timeout=300).steps == total
    assert_same_sae(uninterrupted, SparseAutoencoder.load(zero.output))
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
    assert info["run"]["training.zero_stage"] == 2
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
    ddp = train_config(root, zero.output, **{**zero_options, "zero_stage": None})
    ddp_trainer = SAETrainer(build_sae(zero.sae), total_steps=total)
    with pytest.raises(ValueError, match="training.zero_stage was 2, now null"):
        checkpoint.restore(zero.output, [(zero.output, ddp_trainer)], checkpoint.run_fields(ddp))

    # A DDP job killed midway and submitted again.
    config = train_config(root, str(tmp_path / "killed"), **options)
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    job = subprocess.Popen(
        [sys.executable, "-m", "vlsae_ray.cli", "train", "-c", str(config_file)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = storage.join(config.output, "checkpoints", "latest.json")
    wait_for(lambda: storage.exists(latest), lambda: job.poll() is not None)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and its Ray Train run, midway
    job.wait()
    killed_at = json.loads(storage.read_text(latest))["step"]
    assert 0 < killed_at < total and not storage.exists(storage.join(config.output, "sae.safetensors"))

    resumed = run_train(config)  # the job resubmitted: it goes on from the checkpoint
    assert resumed.steps == total
    assert resumed.samples_per_second > 0
    assert_same_sae(uninterrupted, SparseAutoencoder.load(config.output))
    kept = json.loads(storage.read_text(latest))["kept"]
    assert kept == [total - 8, total]  # older checkpoints are deleted, each rank's two files
    assert len(list((tmp_path / "killed" / "checkpoints").glob("step-*/rank-*"))) == 2 * 2 * 2


def test_bf16_training_through_ray_train_is_the_one_process_bf16_step(ray_cluster, tmp_path, assert_same_sae):
    """`training.precision: bf16` reaches the worker's trainer: its SAE is one process's bf16 run."""
    root = activations(str(tmp_path / "acts"))
    config = train_config(root, str(tmp_path / "sae"), num_workers=1, epochs=1, precision="bf16")
    summary = run_train(config)
    # metrics every 10 steps and at the end, as TensorBoard scalars beside the SAE
    events = EventAccumulator(str(tmp_path / "sae" / "tensorboard"))
    events.Reload()
    fvu = events.Scalars("fvu")
    assert [e.step for e in fvu] == [*range(10, summary.steps, 10), summary.steps]
    assert fvu[-1].value == pytest.approx(summary.metrics["fvu"])

    stream = ActivationStream(root, batch_size=64, seed=config.training.seed, window_shards=4)
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker, whose 0.5 CPU gives it one thread
    for precision in ("bf16", "fp32"):
        torch.manual_seed(config.training.seed)  # as the worker builds its SAE
        sae = build_sae(config.sae)
        trainer = SAETrainer(
            sae,
            total_steps=stream.steps_in_epoch(0),
            lr=1e-3,
            precision=precision,
            sample=stream.init_sample(INIT_SAMPLES)[0],
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
