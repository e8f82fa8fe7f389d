"""Hallucination in the world LLaVA: world POPE and world CHAIR, plain against VL-SAE-mitigated
decoding (`vlsae_ray.steer.hallucination`), with alpha, beta, cd_alpha and cd_beta swept (and
cd_beta with cd_alpha raised), and the cost per generated token.

Per seed: the chat image and text means entering language-model layer LAYER + 1 (the authors'
reduction, `:chat_*_mean`) of `--train-items` world training items and their captions are extracted
with `run_extract` (Ray Data); one `TrainConfig` with an `aligner:` section trains the aligner and
then the VL-SAE on its projections (`run_train`, Ray Train); then `--n` held-out test images (their
(shape, colour) pairs never seen in training) are asked POPE's pairs and "Describe the image."
with `answer` (plain greedy, cached) and `generate_mitigated` at each setting. Seeds change the
training items, the training seed and the test images.

    python benchmarks/hallucination.py                  # 3 seeds, n=40, 1024 training items
    python benchmarks/hallucination.py --seeds 1 &      # or one process per seed on one --out,
    python benchmarks/hallucination.py --report         # then merge their seed-S.json files
    python benchmarks/hallucination.py --seeds 0 --n 60 --sweep defaults   # a quick look
    python benchmarks/hallucination.py --sweep defaults cd_beta --out new   # more settings, then
    python benchmarks/hallucination.py --report --out new --previous benchmarks/results/hallucination.json
    python benchmarks/hallucination.py --cost           # time per token against plain, timed alternately

Writes benchmarks/results/hallucination.{json,md} and hallucination.png (the curves); `--cost`
writes hallucination_cost.json. The seconds_per_token of the sweep are taken one setting after
another, so load from other work on a shared machine changes them more than the decoding does.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlsae_ray.activations.extract import run_extract
from vlsae_ray.config import ExtractConfig, TrainConfig
from vlsae_ray.sae import SparseAutoencoder, build_sae
from vlsae_ray.sae.aligner import Aligner, AlignerConfig
from vlsae_ray.steer.hallucination import DEFAULTS, generate_mitigated
from vlsae_ray.train.ray_train import run_train
from vlsae_ray.world.hallucination import chair, pope_questions, pope_scores
from vlsae_ray.world.llava import WORLD_LLAVA_PATH, answer, load_world_llava
from vlsae_ray.world.vqa import DESCRIBE_PROMPT, POPE_SETTINGS, vqa_item

LAYER = 1  # the edited decoder layer's output (of 3): what enters layer 2
HOOKS = [
    f"language_model.layers.{LAYER + 1}:chat_image_mean",
    f"language_model.layers.{LAYER + 1}:chat_text_mean",
]
SAE = {"architecture": "vl_sae", "d_in": 96, "n_latents": 768, "k": 32}  # 8x, as the authors' LLaVA SAE
# The authors' aligner recipe is batch 2048, lr 5e-5, 50 epochs over CC3M (~3M pairs); a few
# thousand world pairs need a smaller batch and a larger rate to converge in as many epochs.
ALIGNER = {"batch_size": 256, "epochs": 50, "lr": 1e-3}
# Few epochs: each one is a Ray Data read of the shards, seconds of overhead on 2 cores.
TRAINING = {"batch_size": 128, "epochs": 5, "lr": 2e-3, "num_workers": 2, "cpus_per_worker": 0.5}
SWEEPS = {
    "defaults": [{}],
    "alpha": [{"alpha": a} for a in (0.4, 1.0)],
    "beta": [{"beta": b} for b in (0.5, 1.0)],
    "cd_alpha": [{"cd_alpha": c} for c in (0.3, 0.9)],
    # the least plain probability kept, as a share of the best's: lower keeps more tokens for the
    # edited logits to choose among (at 0.8 only near-ties, so a confident wrong word stands)
    "cd_beta": [{"cd_beta": b} for b in (0.5, 0.2, 0.05, 0.01)],
    # a wider candidate set with the edited logits weighted more, up to deciding alone (cd_alpha 1)
    "cd_alpha_beta": [{"cd_alpha": a, "cd_beta": b} for a, b in ((0.9, 0.05), (0.9, 0.01), (1.0, 0.01))],
    # every knob at its strongest: the edited model alone, the text concepts replaced by the image's
    "strongest": [{"alpha": 1.0, "beta": 1.0, "cd_alpha": 1.0, "cd_beta": 0.01}],
}


def train_models(seed: int, train_items: int, root: str):
    """(aligner, VL-SAE, aligner metrics) trained on `train_items` world training items."""
    extract = ExtractConfig(
        source={"kind": "world", "n_items": train_items, "seed": seed, "split": "train"},
        backbone={"library": "llava", "model": str(WORLD_LLAVA_PATH), "device": "cpu"},
        hook_points=HOOKS,
        output=f"{root}/acts",
        shard_rows=256,
        batch_size=128,
        dtype="float32",
    )
    datasets = run_extract(extract).datasets
    config = TrainConfig(
        activations=datasets[HOOKS[0]],
        text_activations=datasets[HOOKS[1]],
        aligner=ALIGNER,
        sae=SAE,
        training={**TRAINING, "seed": seed},
        output=f"{root}/vlsae",
    )
    summary = run_train(config)
    aligner_metrics = {k: v for k, v in summary.metrics.items() if k.startswith("aligner/")}
    return (
        Aligner.load(f"{root}/vlsae/aligner"),
        SparseAutoencoder.load(f"{root}/vlsae").eval(),
        aligner_metrics,
    )


def ask(generate, images, questions, max_new_tokens: int, batch: int = 100) -> tuple[list[str], float]:
    """(replies, wall seconds) of `generate` in batches."""
    replies, start = [], time.perf_counter()
    for i in range(0, len(images), batch):
        replies += generate(images[i : i + batch], questions[i : i + batch], max_new_tokens)
    return replies, time.perf_counter() - start


def measure(generate, items) -> dict:
    """World POPE (per setting) and world CHAIR of one decoding, with its wall time per token."""
    images = [item.image for item, _ in items]
    pope = pope_questions(items)
    # every setting shares the positives: ask each distinct question once
    rows = sorted({(i, q, a) for setting in POPE_SETTINGS for i, q, a in pope[setting]})
    replies, pope_s = ask(generate, [images[i] for i, _, _ in rows], [q for _, q, _ in rows], 1)
    reply = dict(zip(rows, replies, strict=True))
    out = {
        setting: pope_scores([reply[row] for row in pope[setting]], [a for _, _, a in pope[setting]])
        for setting in POPE_SETTINGS
    }
    descriptions, describe_s = ask(generate, images, [DESCRIBE_PROMPT] * len(images), 20)
    out["chair"] = chair(descriptions, [item.labels for item, _ in items])
    out["describe_exact"] = sum(
        d == q.answer
        for d, (_, vqa) in zip(descriptions, items, strict=True)
        for q in vqa
        if q.question_type == "describe"
    ) / len(items)
    tokens = len(rows) + sum(len(d.split()) + 1 for d in descriptions)  # words are tokens; +1 the end token
    out["seconds_per_token"] = (pope_s + describe_s) / tokens
    out["examples"] = descriptions[:3]
    return out


def mitigate(model, processor, aligner, sae, setting, images, questions, max_new_tokens):
    return generate_mitigated(
        model,
        processor,
        images,
        questions,
        aligner,
        sae,
        layer=LAYER,
        max_new_tokens=max_new_tokens,
        **setting,
    )


def run(seeds, n: int, train_items: int, sweeps: list[str], out: Path) -> None:
    """Each seed's results to OUT/seed-S.json as soon as it is done (seeds may run in parallel
    processes on one OUT; `merge` gathers them)."""
    torch.set_num_threads(2)
    model, processor = load_world_llava()
    plain = functools.partial(answer, model, processor)  # (images, questions, max_new_tokens)
    settings = [{**DEFAULTS, **change} for name in sweeps for change in SWEEPS[name]]
    for seed in seeds:
        with tempfile.TemporaryDirectory() as root:
            start = time.perf_counter()
            aligner, sae, aligner_metrics = train_models(seed, train_items, root)
            train_s = time.perf_counter() - start
        items = [vqa_item(i, split="test", seed=seed) for i in range(n)]
        runs = {"plain": measure(plain, items)}
        for setting in settings:
            mitigated = functools.partial(mitigate, model, processor, aligner, sae, setting)
            runs[json.dumps(setting, sort_keys=True)] = measure(mitigated, items)
        result = {
            "settings": settings,
            "n": n,
            "train_seconds": train_s,
            "aligner": aligner_metrics,
            "runs": runs,
        }
        (out / f"seed-{seed}.json").write_text(json.dumps(result, indent=1))
        print(f"seed {seed}: trained in {train_s:.0f} s; {summary_line(runs)}", flush=True)


def cost(n: int, repeats: int = 10) -> dict:
    """Wall time per generated token of mitigated decoding over plain, on one batch of `n` test
    images, per task (a 20-token description, a one-token POPE answer) and cd_beta: the two are
    timed alternately `repeats` times (the first a warm-up) and each one's best time is kept, since
    load from other work only ever adds time. The aligner and VL-SAE are untrained ones of the
    benchmark's shapes: the cost does not depend on their weights."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, processor = load_world_llava()
    aligner = Aligner(AlignerConfig(d_in=model.config.text_config.hidden_size, d_proj=SAE["d_in"])).eval()
    sae = build_sae(SAE).eval()
    images = [vqa_item(i, split="test", seed=0)[0].image for i in range(n)]
    plain = functools.partial(answer, model, processor)

    out = {}
    for task, question, max_new_tokens in (
        ("describe", DESCRIBE_PROMPT, 20),
        ("pope", "Is there a red circle?", 1),
    ):
        for cd_beta in sorted({DEFAULTS["cd_beta"], 0.01}, reverse=True):
            setting = {**DEFAULTS, "cd_beta": cd_beta}
            mitigated = functools.partial(mitigate, model, processor, aligner, sae, setting)
            plain_ms, mitigated_ms = [], []
            for _ in range(repeats):
                for times, generate in ((plain_ms, plain), (mitigated_ms, mitigated)):
                    start = time.perf_counter()
                    replies = generate(images, [question] * n, max_new_tokens)
                    times.append(
                        1000 * (time.perf_counter() - start) / sum(len(r.split()) + 1 for r in replies)
                    )
            out[f"{task}, cd_beta={cd_beta}"] = {
                "plain_ms_per_token": min(plain_ms[1:]),
                "mitigated_ms_per_token": min(mitigated_ms[1:]),
                "x_plain": min(mitigated_ms[1:]) / min(plain_ms[1:]),
                "x_plain_median_of_pairs": statistics.median(
                    m / p for p, m in zip(plain_ms[1:], mitigated_ms[1:], strict=True)
                ),
            }
            print(task, cd_beta, out[f"{task}, cd_beta={cd_beta}"], flush=True)
    return out


def merge(out: Path, previous: Path | None = None) -> dict:
    """{settings, seeds: {seed: result}} of every OUT/seed-S.json (the settings they share, in
    SWEEPS' order). With `previous`, an earlier merged hallucination.json: each seed's settings
    that OUT's runs lack are added from it (its plain and defaults give way to OUT's; such a run
    keeps its own plain's time per token as `plain_seconds_per_token`, and its name is listed in
    the seed's `previous_runs`). Its plain must agree with OUT's: the same model, test images and
    greedy decoding."""
    seeds = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in sorted(out.glob("seed-*.json"))}
    if not seeds:
        raise SystemExit(f"no seed-*.json in {out}: run the benchmark first")
    if previous is not None:
        earlier = json.loads(previous.read_text())["seeds"]
        for seed, result in seeds.items():
            old = earlier.get(str(seed))
            if old is None:
                continue
            plain, old_plain = headline(result["runs"]["plain"]), headline(old["runs"]["plain"])
            if any(plain[k] != old_plain[k] for k in plain if k != "seconds_per_token"):
                raise SystemExit(f"seed {seed}: {previous}'s plain decoding differs from {out}'s")
            for setting in old["settings"]:
                name = json.dumps(setting, sort_keys=True)
                if name not in result["runs"]:
                    run = old["runs"][name]
                    run["plain_seconds_per_token"] = old["runs"]["plain"]["seconds_per_token"]
                    result["runs"][name] = run
                    result["settings"].append(setting)
                    result.setdefault("previous_runs", []).append(name)
    order = {json.dumps({**DEFAULTS, **c}, sort_keys=True): None for cs in SWEEPS.values() for c in cs}
    rank = {name: i for i, name in enumerate(order)}
    shared = [
        s for s in next(iter(seeds.values()))["settings"] if all(s in r["settings"] for r in seeds.values())
    ]
    settings = sorted(shared, key=lambda s: rank.get(json.dumps(s, sort_keys=True), len(rank)))
    return {"settings": settings, "seeds": seeds}


def headline(run: dict) -> dict[str, float]:
    return {
        "chair_i": run["chair"]["chair_i"],
        "hallucinated": run["chair"]["hallucinated_per_description"],
        "chair_i_objects": run["chair"]["chair_i_objects"],
        "coverage": run["chair"]["coverage"],
        "describe_exact": run["describe_exact"],
        **{f"{s.removeprefix('pope_')}_{m}": run[s][m] for s in POPE_SETTINGS for m in ("accuracy", "f1")},
        "adversarial_yes_ratio": run["pope_adversarial"]["yes_ratio"],
        "seconds_per_token": run["seconds_per_token"],
    }


def summary_line(runs: dict) -> str:
    plain, default = headline(runs["plain"]), headline(runs[json.dumps(DEFAULTS, sort_keys=True)])
    return "  ".join(f"{k} {plain[k]:.3f}->{default[k]:.3f}" for k in ("hallucinated", "adversarial_f1"))


def table(results: dict) -> str:
    """Mean ± std over seeds of every run's headline numbers, as a markdown table."""
    seeds = list(results["seeds"].values())
    names = ["plain", *(json.dumps(setting, sort_keys=True) for setting in results["settings"])]
    columns = [*headline(seeds[0]["runs"]["plain"]), "cost_x_plain"]
    lines = ["| decoding | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in names:
        values = [
            headline(s["runs"][name])
            | {
                "cost_x_plain": s["runs"][name]["seconds_per_token"]
                / s["runs"][name].get("plain_seconds_per_token", s["runs"]["plain"]["seconds_per_token"])
            }
            for s in seeds
        ]
        cells = []
        for c in columns:
            xs = [v[c] for v in values]
            spread = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(
                f"{statistics.mean(xs):.3g} ± {spread:.2g}"
                if c == "seconds_per_token"
                else f"{statistics.mean(xs):.3f} ± {spread:.3f}"
            )
        label = "plain" if name == "plain" else ", ".join(f"{k}={v}" for k, v in json.loads(name).items())
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Hallucinated mentions and adversarial-POPE F1 against each swept option (others at defaults;
    settings that change two options at once are in the table only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(results["seeds"].values())

    def varies(option):  # the settings at the defaults but for `option`, the defaults included
        return [s for s in results["settings"] if all(s[k] == DEFAULTS[k] for k in DEFAULTS if k != option)]

    options = [o for o in DEFAULTS if len(varies(o)) > 1]
    fig, axes = plt.subplots(2, len(options), figsize=(4 * len(options), 6), sharey="row", squeeze=False)
    for col, option in enumerate(options):
        points = sorted(varies(option), key=lambda s: s[option])
        xs = [s[option] for s in points]
        for row, metric in enumerate(("hallucinated", "adversarial_f1")):
            ax = axes[row, col]
            for seed, result in zip(results["seeds"], seeds, strict=True):
                ys = [headline(result["runs"][json.dumps(s, sort_keys=True)])[metric] for s in points]
                ax.plot(xs, ys, marker="o", label=f"seed {seed}")
                ax.axhline(
                    headline(result["runs"]["plain"])[metric], ls="--", lw=0.8, color=ax.lines[-1].get_color()
                )
            ax.set_xlabel(option)
            if option == "cd_beta":  # swept over decades
                ax.set_xscale("log")
                ax.minorticks_off()
                ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.set_ylabel(metric if col == 0 else "")
    axes[0, 0].legend(fontsize=7, title="dashed: plain", title_fontsize=7)
    fig.suptitle("world LLaVA: mitigated decoding (others at their defaults) against plain")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=40, help="held-out test images per seed")
    parser.add_argument("--train-items", type=int, default=1024, help="world training items per seed")
    parser.add_argument("--sweep", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--report", action="store_true", help="only merge OUT's seed files and redraw")
    parser.add_argument(
        "--previous",
        type=Path,
        help="an earlier merged hallucination.json whose settings OUT's seed files lack are added per seed",
    )
    parser.add_argument(
        "--cost", action="store_true", help="only time mitigated against plain decoding, alternately"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cost:
        (out / "hallucination_cost.json").write_text(json.dumps(cost(args.n), indent=1))
        return
    if not args.report:
        run(args.seeds, args.n, args.train_items, args.sweep, out)
    results = merge(out, args.previous)
    (out / "hallucination.json").write_text(json.dumps(results, indent=1))
    (out / "hallucination.md").write_text(table(results) + "\n")
    plot(results, out / "hallucination.png")
    print(table(results))


if __name__ == "__main__":
    main()
