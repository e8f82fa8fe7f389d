"""The `vlsae` command: one subcommand per job, plus the end-to-end demo.

    vlsae demo [--s3] [--root URI]      the whole pipeline on this machine
    vlsae extract|train|evaluate|label|steer -c CONFIG
    vlsae serve -c CONFIG               the HTTP API (blocks until interrupted)
    vlsae serve -c CONFIG --print-config    its Serve deploy config (serveConfigV2 of the RayService)
    vlsae local-s3 --dir DIR            a SeaweedFS S3 server on loopback (blocks)
    vlsae plan --d D --latents F ...    memory per worker, layout and FLOPs of latent-sharded training
    vlsae world train|eval              train the concept world's CLIP; its held-out zero-shot accuracy
    vlsae world train-llava|eval-llava  train the world LLaVA; its held-out accuracy per question type

Each job joins the Ray cluster it runs in (`ray job submit`) or starts a local one on loopback.
Run as a program, the demo and the jobs show one progress bar per stage and a one-line result; Ray's
logs and every library's go to a file (its path is printed) unless --verbose shows them here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

from vlsae_ray import progress
from vlsae_ray.config import (
    ConfigError,
    EvaluateConfig,
    ExtractConfig,
    LabelConfig,
    ServeConfig,
    SteerConfig,
    TrainConfig,
    load_config,
)
from vlsae_ray.storage import StorageError


def _extract(config: ExtractConfig):
    from vlsae_ray.activations.extract import run_extract

    return run_extract(config)


def _train(config: TrainConfig):
    from vlsae_ray.train.ray_train import run_train

    return run_train(config)


def _evaluate(config: EvaluateConfig):
    from vlsae_ray.eval.evaluate import run_evaluate

    return run_evaluate(config)


def _label(config: LabelConfig):
    from vlsae_ray.interpret.label import run_label

    return run_label(config)


def _steer(config: SteerConfig):
    from vlsae_ray.steer.job import run_steer

    return run_steer(config)


JOBS = {
    "extract": (ExtractConfig, _extract, "extract backbone activations into a shard dataset"),
    "train": (TrainConfig, _train, "train an SAE on an activation dataset with Ray Train"),
    "evaluate": (EvaluateConfig, _evaluate, "FVU, L0, dead latents and Monosemanticity Score of an SAE"),
    "label": (LabelConfig, _label, "top examples and a name for every latent, in the concept catalog"),
    "steer": (SteerConfig, _steer, "clamp each concept latent inside the model and measure the flips"),
}


def run_job(name: str, config_uri: str):
    """Load and validate the config (before any work), then run the job."""
    model, job, _ = JOBS[name]
    return job(load_config(config_uri, model))


def _quiet_unless_verbose(args: argparse.Namespace) -> str | None:
    """Send this process's logs to TMPDIR/vlsae-logs/COMMAND-TIME-PID.log unless --verbose; the path."""
    if getattr(args, "verbose", True):
        return None
    name = f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path = os.path.join(tempfile.gettempdir(), "vlsae-logs", name)
    progress.quiet(path)
    progress.echo(f"vlsae {args.command}: logs in {path} (--verbose shows them here)")
    return path


def serve_forever(config_uri: str) -> None:
    """Deploy the serve config's deploy document (`vlsae_ray.deploy`, as a RayService would) and wait."""
    import time

    from ray import serve

    from vlsae_ray.deploy import build_application, serve_deploy_config
    from vlsae_ray.local_stack import connect_ray

    config = load_config(config_uri, ServeConfig)
    deploy = serve_deploy_config(config)
    connect_ray()
    serve.start(http_options=deploy["http_options"])
    for app in deploy["applications"]:
        serve.run(build_application(app), name=app["name"], route_prefix=app["route_prefix"])
    url = f"http://{config.host}:{config.port}"
    print(
        f"serving the API at {url}/v1 ({url}/docs), the concept explorer at {url}/ (Ctrl-C to stop)",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def run_local_s3(data_dir: str, port: int, buckets: tuple[str, ...]) -> None:
    import time

    from vlsae_ray.local_stack import SeaweedFS

    with SeaweedFS(data_dir, buckets, s3_port=port) as server:
        print(f"export AWS_ENDPOINT_URL={server.endpoint}", flush=True)
        try:
            while server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


def run_world(args: argparse.Namespace) -> None:
    import json

    if args.world_command == "train":
        from vlsae_ray.world.train import DEFAULT_STEPS, train_world_clip

        steps = args.steps or DEFAULT_STEPS
        result = train_world_clip(args.out, seed=args.seed, steps=steps, threads=args.threads)
        print(
            f"wrote {result.checkpoint}: {result.checkpoint_bytes / 2**20:.1f} MiB, "
            f"{result.wall_time_s:.0f} s wall, final loss {result.final_loss:.3f}"
        )
    elif args.world_command == "eval":
        from vlsae_ray.world.zeroshot import evaluate_world_clip

        checkpoint = {"checkpoint": args.checkpoint} if args.checkpoint else {}
        print(json.dumps(evaluate_world_clip(**checkpoint, n=args.n), indent=1))
    elif args.world_command == "train-llava":
        from vlsae_ray.world.train_llava import DEFAULT_STEPS as LLAVA_STEPS
        from vlsae_ray.world.train_llava import train_world_llava

        result = train_world_llava(
            args.out, seed=args.seed, steps=args.steps or LLAVA_STEPS, threads=args.threads
        )
        print(
            f"wrote {result.folder}: {result.folder_bytes / 2**20:.1f} MiB, "
            f"{result.wall_time_s:.0f} s wall, loss {result.first_loss:.3f} -> {result.final_loss:.3f}"
        )
    else:
        from vlsae_ray.world.llava import WORLD_LLAVA_PATH, evaluate_world_llava

        folder = args.folder or WORLD_LLAVA_PATH
        print(
            json.dumps(evaluate_world_llava(args.n, args.seed, folder=folder, threads=args.threads), indent=1)
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlsae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "--verbose", action="store_true", help="show Ray's and every library's logs here, not in a log file"
    )
    demo = commands.add_parser(
        "demo", parents=[verbose], help="run the whole pipeline on this machine and print a summary"
    )
    demo.add_argument(
        "--root", help="where artifacts go (path or s3:// URI); default ./vlsae-demo, or a bucket with --s3"
    )
    demo.add_argument(
        "--s3", action="store_true", help="start a local SeaweedFS S3 server and keep every artifact there"
    )
    demo.add_argument("--items", type=int, default=2048, help="image-caption items to extract")
    for name, (_, _, help_text) in JOBS.items():
        job = commands.add_parser(name, parents=[verbose], help=help_text)
        job.add_argument("-c", "--config", required=True, help="YAML config (path, file:// or s3:// URI)")
    serve_cmd = commands.add_parser(
        "serve", help="serve the interpretation API and the concept explorer with Ray Serve"
    )
    serve_cmd.add_argument("-c", "--config", required=True)
    serve_cmd.add_argument(
        "--print-config",
        action="store_true",
        help="print the Serve deploy config it would deploy (for `serve deploy` and a RayService) and exit",
    )
    s3 = commands.add_parser("local-s3", help="run a SeaweedFS S3 server on 127.0.0.1 until interrupted")
    s3.add_argument("--dir", required=True, help="folder for its data (kept between runs)")
    s3.add_argument("--port", type=int, default=8333)
    s3.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    plan_cmd = commands.add_parser(
        "plan", help="memory per worker, sharding layout and step FLOPs of a wide SAE on n GPUs"
    )
    plan_cmd.add_argument("--d", type=int, required=True, help="activation width d (1024 for CLIP ViT-L)")
    plan_cmd.add_argument("--latents", type=int, required=True, help="number of latents F")
    plan_cmd.add_argument("--k", type=int, required=True, help="active latents per sample")
    plan_cmd.add_argument("--batch", type=int, required=True, help="global batch (samples per step)")
    plan_cmd.add_argument(
        "--precision",
        default="fp32",
        help="the trainer's training.precision: fp32, tf32 or bf16 (fp32 weights and Adam; bf16 forward)",
    )
    plan_cmd.add_argument("--gpus", type=int, required=True, help="number of GPUs (workers)")
    plan_cmd.add_argument("--gpu-memory-gb", type=float, required=True, help="memory of one GPU in GiB")
    plan_cmd.add_argument("--zero-stage", type=int, help="DeepSpeed ZeRO stage 0, 1 or 2 (default: try all)")
    plan_cmd.add_argument("--aux-k", type=int, help="AuxK dead latents (default d // 2; 0: no AuxK loss)")
    world = commands.add_parser(
        "world", help="the concept world's CLIP and LLaVA: train them, or measure them"
    )
    world_commands = world.add_subparsers(dest="world_command", required=True)
    world_train = world_commands.add_parser("train", help="train the world CLIP from its seed (CPU)")
    world_train.add_argument("--out", required=True, help="checkpoint file to write")
    world_train.add_argument("--seed", type=int, default=0)
    world_train.add_argument("--steps", type=int, help="default: the committed checkpoint's")
    world_train.add_argument("--threads", type=int, default=2)
    world_eval = world_commands.add_parser("eval", help="held-out zero-shot accuracy per attribute")
    world_eval.add_argument("--checkpoint", help="default: the committed checkpoint")
    world_eval.add_argument("--n", type=int, default=2000, help="held-out images to score")
    llava_train = world_commands.add_parser(
        "train-llava", help="train the world LLaVA's projector and language model from its seed (CPU)"
    )
    llava_train.add_argument("--out", required=True, help="folder to save the model and processor in")
    llava_train.add_argument("--seed", type=int, default=0)
    llava_train.add_argument("--steps", type=int, help="default: the committed model's")
    llava_train.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; the committed model used 1 (see train_llava.py)",
    )
    llava_eval = world_commands.add_parser(
        "eval-llava", help="the world LLaVA's held-out accuracy per question type"
    )
    llava_eval.add_argument("--folder", help="default: the committed world LLaVA")
    llava_eval.add_argument("--n", type=int, default=500, help="held-out images to ask about")
    llava_eval.add_argument("--seed", type=int, default=0)
    llava_eval.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    # only a program owns its stdout and stderr: a Python caller of main(argv) keeps its own
    log_path = _quiet_unless_verbose(args) if argv is None else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            from vlsae_ray.demo import run_demo

            run_demo(root=args.root, use_s3=args.s3, n_items=args.items)
        elif args.command == "serve" and args.print_config:
            from vlsae_ray.deploy import render_serve_deploy_config

            print(render_serve_deploy_config(load_config(args.config, ServeConfig), args.config), end="")
        elif args.command == "serve":
            serve_forever(args.config)
        elif args.command == "plan":
            from vlsae_ray.train.plan import format_plan, plan

            p = plan(
                args.d,
                args.latents,
                args.k,
                args.batch,
                args.precision,
                args.gpus,
                args.gpu_memory_gb,
                zero_stage=args.zero_stage,
                aux_k=args.aux_k,
            )
            print(format_plan(p))
        elif args.command == "world":
            run_world(args)
        elif args.command == "local-s3":
            run_local_s3(args.dir, args.port, tuple(args.bucket))
        else:
            summary = run_job(args.command, args.config)
            progress.echo(summary.model_dump_json(indent=None if log_path else 1))
    except (ConfigError, StorageError, FileNotFoundError, ValueError) as error:
        progress.echo(f"vlsae {args.command}: error: {error}", error=True)
        return 2
    except Exception as error:
        if log_path is None:
            raise
        logging.getLogger("vlsae").exception("vlsae %s failed", args.command)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        progress.echo(
            f"vlsae {args.command}: failed: {type(error).__name__}: {first_line} (see {log_path})", True
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
