"""File sources: listing order and ids, images and captions, bad input reported with ids."""

import io
import json
import re
import tarfile

import numpy as np
import pytest

from vlsae_ray import storage
from vlsae_ray.activations.sources import expand_uris, list_items, read_images
from vlsae_ray.config import ConfigError, SourceConfig

KINDS = ["webdataset", "parquet", "folder"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_source_lists_reads_and_reports_bad_input(kind, caption_dataset, tmp_path):
    data = caption_dataset
    config, ids = data.write(kind, str(tmp_path))
    listing = list_items(config)
    assert [item.id for item in listing.items] == ids  # file after file, in order
    assert [item.caption for item in listing.items] == [data.caption(i) for i in range(data.n_items)]
    assert len(listing.unreadable) == 1 and "-2" in next(iter(listing.unreadable))  # the third file

    images = list(read_images(config, listing.items))
    for i, image in enumerate(images):
        if i == data.bad_image:
            assert isinstance(image, str) and "corrupt image" in image
        else:
            assert np.array_equal(np.asarray(image), np.asarray(data.photo(i)))
    # a listing is the same every time, and n_items keeps its first items
    limited = list_items(config.model_copy(update={"n_items": 7}))
    assert limited.items == listing.items[:7] and limited.unreadable == {}


def test_webdataset_on_s3_matches_local(caption_dataset, s3_root, tmp_path):
    local, _ = caption_dataset.write("webdataset", str(tmp_path))
    remote, _ = caption_dataset.write("webdataset", s3_root)
    local_items, remote_items = list_items(local).items, list_items(remote).items
    assert [item.id for item in remote_items] == [item.id for item in local_items]
    for a, b in zip(read_images(local, local_items), read_images(remote, remote_items), strict=True):
        assert (a == b) if isinstance(a, str) else np.array_equal(np.asarray(a), np.asarray(b))


def test_folder_captions_as_csv(caption_dataset, tmp_path):
    config, ids = caption_dataset.write("folder", str(tmp_path))
    folder = config.uris[0]
    rows = [
        json.loads(line) for line in storage.read_text(storage.join(folder, "captions.jsonl")).splitlines()
    ]
    csv_text = "file,caption\n" + "".join(f"{row['file']},{row['caption'] or ''}\n" for row in rows)
    storage.write_text(storage.join(folder, "captions.csv"), csv_text)
    items = list_items(SourceConfig(kind="folder", uris=[folder], captions="captions.csv")).items
    assert [item.id for item in items] == ids[:6]
    assert [item.caption for item in items] == [caption_dataset.caption(i) for i in range(6)]


def test_missing_image_file_and_sample_without_image_are_bad(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "captions.jsonl").write_text(json.dumps({"file": "gone.png", "caption": "x"}))
    config = SourceConfig(kind="folder", uris=[str(folder)])
    assert list(read_images(config, list_items(config).items)) == ["image file is missing"]

    tar_path = tmp_path / "t.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("only-caption.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"c"))
    config = SourceConfig(kind="webdataset", uris=[str(tar_path)])
    items = list_items(config).items
    assert [(item.id, item.caption) for item in items] == [("t/only-caption", "c")]
    assert list(read_images(config, items)) == ["no image in the sample"]


def test_bad_source_configs_say_what_to_fix(caption_dataset, tmp_path):
    config, _ = caption_dataset.write("parquet", str(tmp_path))
    with pytest.raises(ConfigError, match="no column 'image'.*columns: jpg, text.*source.image_column"):
        list_items(config.model_copy(update={"image_column": "image"}))
    twice = config.model_copy(update={"uris": [config.uris[0], config.uris[0]]})
    with pytest.raises(ValueError, match="item id 'part-0.parquet#0' occurs in both"):
        list_items(twice)
    with pytest.raises(ValueError, match="needs source.uris"):
        SourceConfig(kind="webdataset")
    with pytest.raises(ValueError, match="empty range"):
        expand_uris(["a-{5..2}.tar"])


def test_expand_uris():
    assert expand_uris(["s3://b/x-{08..11}.tar", "y.tar"]) == [
        "s3://b/x-08.tar",
        "s3://b/x-09.tar",
        "s3://b/x-10.tar",
        "s3://b/x-11.tar",
        "y.tar",
    ]
    assert expand_uris(["{0..1}/{0..1}"]) == ["0/0", "0/1", "1/0", "1/1"]


def test_expand_uris_globs(store_root):
    names = [
        "a/x-1.tar",
        "a/x-2.tar",
        "a/x-10.tar",
        "a/y-1.tar",
        "a/sub/x-3.tar",
        "b/x-1.tar",
        "c/f/captions.jsonl",
    ]
    for name in [*names, "s-0/p.tar", "s-1/q.tar", "s-2/r.tar"]:
        storage.write_bytes(storage.join(store_root, name), b"")

    def expand(*patterns):
        return expand_uris([storage.join(store_root, pattern) for pattern in patterns])

    def uris(*names):
        return [storage.join(store_root, name) for name in names]

    assert expand("a/x-*.tar") == uris("a/x-1.tar", "a/x-10.tar", "a/x-2.tar")  # sorted as strings
    assert expand("a/x-?.tar", "b/x-1.tar") == uris("a/x-1.tar", "a/x-2.tar", "b/x-1.tar")
    assert expand("*/x-1.tar") == uris("a/x-1.tar", "b/x-1.tar")  # any segment; `*` stops at "/"
    assert expand("c/*") == uris("c/f")  # folders match too (folder sources)
    assert expand("s-{0..1}/*.tar") == uris("s-0/p.tar", "s-1/q.tar")  # ranges first, then globs
    pattern = storage.join(store_root, "a/z-*.tar")
    with pytest.raises(ValueError, match=f"source URI pattern {re.escape(repr(pattern))} matches no file"):
        expand_uris([pattern])


def test_expand_uris_globs_relative_and_file_uris(tmp_path, monkeypatch):
    for name in ["x-1.tar", "x-2.tar", "d/y.tar"]:
        storage.write_bytes(str(tmp_path / name), b"")
    monkeypatch.chdir(tmp_path)
    assert expand_uris(["x-*.tar", "*/y.tar"]) == ["x-1.tar", "x-2.tar", "d/y.tar"]
    assert expand_uris([f"file://{tmp_path}/*/*.tar"]) == [f"file://{tmp_path}/d/y.tar"]


def test_webdataset_glob_lists_what_its_range_lists(caption_dataset, s3_root):
    config, _ = caption_dataset.write("webdataset", s3_root)
    globbed = config.model_copy(update={"uris": [storage.join(s3_root, "part-*.tar")]})
    assert list_items(globbed) == list_items(config)
