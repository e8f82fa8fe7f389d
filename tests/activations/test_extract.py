"""Extraction on a real local Ray, to a local folder and to the SeaweedFS server."""

import concurrent.futures
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from vlsae_ray import storage
from vlsae_ray.activations import extract, store
from vlsae_ray.activations.extract import run_extract
from vlsae_ray.activations.sources import BadInputError, list_items, load_image, source_items
from vlsae_ray.backbones import builtin_backbone, load_backbone
from vlsae_ray.config import ExtractConfig, SourceConfig, TokenConfig

HOOKS = ["visual.transformer.resblocks.1", "visual", "text"]


def extract_config(root: str, n_items: int = 48, **update) -> ExtractConfig:
    backbone = builtin_backbone(storage.join(root, "world-clip.pt"))
    config = {
        "source": {"n_items": n_items},
        "backbone": backbone.model_dump(),
        "hook_points": HOOKS,
        "output": storage.join(root, "acts"),
        "shard_rows": 16,
        "batch_size": 8,
    }
    return ExtractConfig.model_validate(config | update)


def direct_rows(config: ExtractConfig, images, captions, ids) -> dict:
    """The same model's rows on the same inputs in one forward, cast to the stored dtype."""
    backbone = load_backbone(config.backbone)
    rows = backbone.activations(
        config.hook_points, pixels=backbone.pixels(images), texts=captions, item_ids=ids, token=config.token
    )
    dtype = store.DTYPES[config.dtype]
    return {hook: (r.values.to(dtype).float(), [ids[i] for i in r.item], r.token) for hook, r in rows.items()}


def stored_rows(dataset: str):
    """(activations, source ids, token index) of a whole dataset; reading verifies every checksum."""
    xs, ids, tokens = [], [], []
    for x, source_ids, token_index in store.iter_shards(dataset):
        xs.append(x.float())
        ids.extend(source_ids)
        tokens.append(token_index)
    return torch.cat(xs), ids, torch.cat(tokens)


def kill_before_last_commit(dataset: str) -> None:
    """Leave a complete `dataset` as a job killed before it committed its last shard leaves it: its
    other shards committed one by one, its last shard never written."""
    manifest = store.read_manifest(dataset)
    # the records as the job's write tasks returned them (with their statistics), from the same shards
    records = [
        store.write_shard(dataset, r.index, *store.read_shard(dataset, r), r.skipped) for r in manifest.shards
    ]
    for uri in storage.list_prefix(dataset):
        if uri.endswith(records[-1].name) or not uri.endswith((".safetensors", "run.json")):
            storage.delete(uri)
    header = manifest.model_copy(update={"shards": store.ShardTable(), "stats": None})
    for record in records[:-1]:
        header = store.commit(dataset, header, [record])


def assert_matches(dataset: str, expected) -> None:
    x, ids, tokens = stored_rows(dataset)
    x_expected, ids_expected, tokens_expected = expected
    assert ids == ids_expected and torch.equal(tokens, tokens_expected)
    torch.testing.assert_close(x, x_expected, atol=2e-3, rtol=2e-3)


@pytest.mark.slow
def test_extract_matches_direct_forward_and_resumes(ray_cluster, store_root):
    config = extract_config(store_root)
    summary = run_extract(config)
    assert summary.rows == dict.fromkeys(HOOKS, 48)
    assert (summary.shards_written, summary.shards_skipped, summary.skipped_items) == (3, 0, {})

    items = source_items(config.source)
    ids = [item["id"] for item in items]
    images = [load_image(item_id) for item_id in ids]
    expected = direct_rows(config, images, [item["caption"] for item in items], ids)
    for hook in HOOKS:
        # every row traces back to its item, once, in order; image and text rows pair row for row
        assert_matches(summary.datasets[hook], expected[hook])
    x, _, _ = stored_rows(summary.datasets["visual"])
    stats = store.read_manifest(summary.datasets["visual"]).stats
    torch.testing.assert_close(torch.tensor(stats["mean"]), x.double().mean(0).float())
    assert stats["mean_squared_norm"] == pytest.approx(float(x.double().pow(2).sum(1).mean()), rel=1e-6)

    # A job killed after writing shard 2 but before committing it: the rerun writes only that shard.
    dataset = summary.datasets[HOOKS[0]]
    manifest = store.read_manifest(dataset)
    before = stored_rows(dataset)
    other_hook = store.read_manifest(summary.datasets["visual"])
    kill_before_last_commit(dataset)
    rerun = run_extract(config)
    assert (rerun.shards_written, rerun.shards_skipped) == (1, 2)
    after = stored_rows(dataset)
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and torch.equal(before[2], after[2])
    assert store.read_manifest(dataset) == manifest  # same bytes (checksums), same stats
    assert store.read_manifest(summary.datasets["visual"]) == other_hook  # its committed shard 2 was kept


@pytest.mark.parametrize("kind", ["webdataset", "parquet", "folder"])
def test_file_sources_skip_bad_input_and_keep_pairs(kind, caption_dataset, ray_cluster, s3_root, tmp_path):
    data = caption_dataset
    root = s3_root if kind == "webdataset" else str(tmp_path)
    source, ids = data.write(kind, storage.join(root, "data"))
    config = extract_config(root, hook_points=["visual", "text"], shard_rows=4, batch_size=3)
    config = config.model_copy(update={"source": source})
    summary = run_extract(config)

    bad = {data.bad_image, data.no_caption}
    assert (summary.items, summary.rows) == (10, {"visual": 8, "text": 8})
    assert summary.skipped_items == {"bad_image": 1, "missing_caption": 1}
    assert [uri.rsplit("/", 1)[1] for uri in summary.unreadable_sources] in (
        ["part-2.tar"],
        ["part-2.parquet"],
        ["folder-2"],
    )
    good = [i for i in range(10) if i not in bad]
    expected = direct_rows(
        config, [data.photo(i) for i in good], [data.caption(i) for i in good], [ids[i] for i in good]
    )
    for hook in ("visual", "text"):
        assert_matches(summary.datasets[hook], expected[hook])
        skipped = [record.skipped for record in store.read_manifest(summary.datasets[hook]).shards]
        # the bad items keep their shards (item 3 in shard 0, item 7 in shard 1), with their ids
        assert skipped == [
            {"bad_image": [ids[data.bad_image]]},
            {"missing_caption": [ids[data.no_caption]]},
            {},
        ]
    run_info = storage.read_text(storage.join(summary.datasets["text"], "run.json"))
    assert json.loads(run_info)["results"]["skipped_items"] == summary.skipped_items
    assert run_extract(config).shards_written == 0


def test_fail_fast_stops_at_the_first_bad_item(caption_dataset, ray_cluster, tmp_path):
    source, _ = caption_dataset.write("folder", str(tmp_path / "data"))
    config = extract_config(str(tmp_path), hook_points=["visual"], shard_rows=4, fail_fast=True)
    with pytest.raises(ValueError, match="cannot read source file .*folder-2.*set fail_fast: false"):
        run_extract(config.model_copy(update={"source": source}))
    readable = source.model_copy(update={"uris": source.uris[:2]})
    with pytest.raises(BadInputError, match=r"^item 'img-0003.png': corrupt image.*set fail_fast: false"):
        run_extract(config.model_copy(update={"source": readable}))
    manifest = store.read_manifest_or_none(storage.join(config.output, "visual"))
    assert manifest is None or 0 not in [shard.index for shard in manifest.shards]  # never committed


@pytest.mark.parametrize("token", [TokenConfig(mode="random", k=2, seed=3), TokenConfig(mode="all")])
def test_token_modes_give_each_items_rows_through_the_pipeline(token, ray_cluster, tmp_path):
    config = extract_config(str(tmp_path), n_items=10, token=token, shard_rows=4, batch_size=3)
    summary = run_extract(config)
    items = source_items(config.source)
    ids = [item["id"] for item in items]
    expected = direct_rows(config, [load_image(i) for i in ids], [item["caption"] for item in items], ids)
    for hook in HOOKS:
        assert_matches(summary.datasets[hook], expected[hook])
    _, block_ids, block_tokens = stored_rows(summary.datasets[HOOKS[0]])
    n_tokens = len(block_ids) // 10
    assert n_tokens == 2 if token.mode == "random" else n_tokens > 2
    assert block_ids == [item_id for item_id in ids for _ in range(n_tokens)]  # rows per item, items in order
    assert len(set(zip(block_ids, block_tokens.tolist(), strict=True))) == len(block_ids)
    assert summary.rows["visual"] == 10  # a pooled hook point gives one row per item in any mode


def kill_test_config(root: str) -> ExtractConfig:
    return extract_config(root, n_items=32, hook_points=HOOKS[:2], shard_rows=4)


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory) -> dict[str, str]:
    """The kill tests' extraction run without a kill: its datasets by hook point."""
    return run_extract(kill_test_config(str(tmp_path_factory.mktemp("uninterrupted")))).datasets


def assert_every_row_once(datasets: dict[str, str], reference: dict[str, str], n_rows: int) -> None:
    """Each (item, token) stored once, with the reference run's values, shards and checksums."""
    for hook, dataset in datasets.items():
        x, ids, tokens = stored_rows(dataset)  # verifies every shard's checksum
        assert len(ids) == n_rows and len(set(zip(ids, tokens.tolist(), strict=True))) == n_rows
        x_ref, ids_ref, tokens_ref = stored_rows(reference[hook])
        assert torch.equal(x, x_ref) and ids == ids_ref and torch.equal(tokens, tokens_ref)
        assert store.read_manifest(dataset).shards == store.read_manifest(reference[hook]).shards


SLOW_COMMITS = """
import sys, time
from vlsae_ray.activations import extract, store
from vlsae_ray.config import ExtractConfig

commit = store.commit
def slow_commit(*args, **kwargs):  # widen the window between commits so the kill lands midway
    manifest = commit(*args, **kwargs)
    time.sleep(0.3)
    return manifest
extract.store.commit = slow_commit
extract.run_extract(ExtractConfig.model_validate_json(sys.argv[1]))
"""


@pytest.mark.slow
def test_a_killed_job_reruns_to_every_row_exactly_once(ray_cluster, uninterrupted, tmp_path):
    import ray

    config = kill_test_config(str(tmp_path))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    job = subprocess.Popen(
        [sys.executable, "-c", SLOW_COMMITS, config.model_dump_json()], env=env, start_new_session=True
    )
    dataset = storage.join(config.output, HOOKS[0])
    try:
        while job.poll() is None and len(getattr(store.read_manifest_or_none(dataset), "shards", [])) < 2:
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the job's own process group: the driver and its children
        job.wait()
    killed = [store.read_manifest(storage.join(config.output, hook)) for hook in HOOKS[:2]]
    assert 2 <= len(killed[0].shards) < 8 and killed[0].stats is None
    committed_in_both = {s.index for s in killed[0].shards} & {s.index for s in killed[1].shards}

    rerun = run_extract(config)
    assert (rerun.shards_written, rerun.shards_skipped) == (
        8 - len(committed_in_both),
        len(committed_in_both),
    )
    assert_every_row_once(rerun.datasets, uninterrupted, n_rows=32)


@pytest.mark.slow
def test_a_killed_model_actor_is_replaced_and_every_row_lands_once(
    ray_cluster, uninterrupted, tmp_path, monkeypatch
):
    from ray.util.state import list_actors

    config = kill_test_config(str(tmp_path))
    started, gate = tmp_path / "started", tmp_path / "gate"
    started.touch()
    gate.write_text("1")  # batches a model process may start before it waits (while the gate exists)

    class GatedExtractor(extract._Extractor):  # a local class: Ray ships it to the actor by value
        calls = 0

        def __call__(self, batch):
            with started.open("a") as log:  # which model process started which shard
                log.write(f"{int(batch['shard'][0])} {os.getpid()}\n")
            self.calls += 1
            while gate.exists() and self.calls > int(gate.read_text() or 0):
                time.sleep(0.02)
            return super().__call__(batch)

    def batches() -> list[tuple[int, int]]:  # (shard, model process id) per batch started
        return [tuple(map(int, line.split())) for line in started.read_text().splitlines()]

    def written(shard: int) -> bool:  # in the last hook point's dataset, written last
        return storage.exists(storage.join(config.output, HOOKS[1], store.shard_name(shard)))

    monkeypatch.setattr(extract, "_Extractor", GatedExtractor)
    dataset = storage.join(config.output, HOOKS[0])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(run_extract, config)
        try:
            # Let the actor take one batch more each time the shards it took are written, until one is
            # committed (the driver commits a shard once the next one is written); it then waits
            # inside its next batch.
            allowed = 1
            while not job.done():
                taken = batches()
                if len(taken) > allowed:  # the actor waits inside its next batch
                    if getattr(store.read_manifest_or_none(dataset), "shards", None):  # one committed
                        break
                    if all(written(shard) for shard, _ in taken[:-1]):
                        allowed += 1
                        gate.write_text(str(allowed))
                time.sleep(0.05)
            before = batches()
            committed_before_kill = len(store.read_manifest(dataset).shards)
            model_actor = ("class_name", "=", "MapWorker(MapBatches(GatedExtractor))")
            (actor,) = list_actors(ray_cluster, filters=[("state", "=", "ALIVE"), model_actor])
            assert {pid for _, pid in before} == {actor.pid}
            os.kill(actor.pid, signal.SIGKILL)
        finally:
            gate.unlink()
        summary = job.result(timeout=120)

    # one run wrote every shard; the kill landed midway, inside a batch
    assert (summary.shards_written, summary.shards_skipped) == (8, 0)
    assert 1 <= committed_before_kill < len(before) < 8
    with pytest.raises(ProcessLookupError):
        os.kill(actor.pid, 0)  # the killed process is gone
    # a new process took the interrupted batch and every one not yet done, each once
    after = batches()[len(before) :]
    (new_pid,) = {pid for _, pid in after}
    assert new_pid != actor.pid
    assert sorted(shard for shard, _ in after) == sorted(set(range(8)) - {shard for shard, _ in before[:-1]})
    assert_every_row_once(summary.datasets, uninterrupted, n_rows=32)


def test_extract_refuses_a_different_dataset_at_the_output(ray_cluster, tmp_path):
    config = extract_config(str(tmp_path), n_items=16)
    run_extract(config)
    other = config.model_copy(update={"source": SourceConfig(n_items=20)})
    with pytest.raises(
        ValueError, match="already holds a different activation dataset: source gave .*'n_items': 16"
    ):
        run_extract(other)
    for update, setting in [
        ({"dtype": "float32"}, "dtype gave dtype='float16' there, 'float32' here"),
        ({"token": TokenConfig(mode="mean")}, "token gave token='cls' there, 'mean' here"),
    ]:
        with pytest.raises(ValueError, match=f"{setting}.*set these back.*choose another output URI"):
            run_extract(config.model_copy(update=update))


def other_weights(checkpoint: bytes) -> bytes:
    """The world CLIP's checkpoint with one weight changed: another fine-tune of the same model."""
    state = torch.load(io.BytesIO(checkpoint), weights_only=True)
    name = next(iter(state["state_dict"]))
    state["state_dict"][name] = state["state_dict"][name] + 1e-3
    out = io.BytesIO()
    torch.save(state, out)
    return out.getvalue()


def test_a_resume_with_other_backbone_weights_is_refused(ray_cluster, store_root):
    """Weights are named by the checkpoint's content: another file, or a changed file at the same URI,
    is refused before any work; the same weights (even copied to another URI) resume."""
    config = extract_config(store_root, n_items=8, hook_points=["visual"], shard_rows=4)
    dataset = run_extract(config).datasets["visual"]
    kill_before_last_commit(dataset)
    interrupted = store.read_manifest(dataset)
    checkpoint = storage.read_bytes(config.backbone.pretrained)

    other_file = storage.join(store_root, "other-clip.pt")
    storage.write_bytes(other_file, other_weights(checkpoint))
    refusal = r"backbone\.pretrained gave weights='sha256:[0-9a-f]{64}' there, 'sha256:[0-9a-f]{64}' here"
    with pytest.raises(
        ValueError, match=f"{refusal}.*{config.backbone.pretrained!r} there, {other_file!r} here"
    ):
        run_extract(
            config.model_copy(
                update={"backbone": config.backbone.model_copy(update={"pretrained": other_file})}
            )
        )
    storage.write_bytes(config.backbone.pretrained, other_weights(checkpoint))  # changed in place
    with pytest.raises(ValueError, match=refusal):
        run_extract(config)
    assert store.read_manifest(dataset) == interrupted  # nothing was written
    # another library's model cannot load here (no weights download): the check itself, on this dataset
    other_library = config.model_copy(
        update={"backbone": config.backbone.model_copy(update={"library": "transformers"})}
    )
    items = list_items(config.source).items
    with pytest.raises(
        ValueError, match="backbone.library gave library='open_clip' there, 'transformers' here"
    ):
        extract._open_manifests(other_library, {"visual": dataset}, {"visual": interrupted.d}, items)

    storage.write_bytes(config.backbone.pretrained, checkpoint)  # the original weights back
    copied = storage.join(store_root, "copy-of-world-clip.pt")
    storage.write_bytes(copied, checkpoint)
    same_weights = config.model_copy(
        update={"backbone": config.backbone.model_copy(update={"pretrained": copied})}
    )
    rerun = run_extract(same_weights)
    assert (rerun.shards_written, rerun.shards_skipped) == (1, 1)
    assert store.read_manifest(dataset).complete and stored_rows(dataset)[0].shape[0] == 8


def test_bad_hook_point_fails_before_any_work(tmp_path):
    config = extract_config(str(tmp_path)).model_copy(
        update={"hook_points": ["visual.transformer.resblocks.99"]}
    )
    with pytest.raises(ValueError, match="valid hook points"):
        run_extract(config)
    assert not storage.exists(storage.join(config.output, "visual.transformer.resblocks.99", "manifest.json"))


def test_a_missing_checkpoint_file_fails_before_any_work(tmp_path):
    missing = f"file://{tmp_path}/missing.pt"
    config = extract_config(str(tmp_path), hook_points=["visual"])
    config = config.model_copy(
        update={"backbone": config.backbone.model_copy(update={"pretrained": missing})}
    )
    with pytest.raises(ValueError, match=f"backbone.pretrained '{missing}': no checkpoint file there"):
        run_extract(config)
    assert store.read_manifest_or_none(storage.join(config.output, "visual")) is None
