"""Small image-caption datasets of real photos in each file source format, with known bad input.

Every dataset has 10 items in 2 source files (6 + 4 items) plus a third source file that cannot
be read. Item 3's image is corrupt and item 7 has no caption; the rest are good.
"""

from __future__ import annotations

import io
import json
import tarfile
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlsae_ray import storage
from vlsae_ray.activations.sources import load_image, package_photo_items
from vlsae_ray.config import SourceConfig

N_ITEMS, BAD_IMAGE, NO_CAPTION = 10, 3, 7
SPLIT = 6  # items in the first source file
CORRUPT = b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 64  # a JPEG header with nothing after it


def photo(i: int) -> Image.Image:
    return load_image(package_photo_items(N_ITEMS)[i]["id"]).resize((48, 40))


def encoded(i: int) -> bytes:
    if i == BAD_IMAGE:
        return CORRUPT
    out = io.BytesIO()
    photo(i).save(out, format="PNG")
    return out.getvalue()


def caption(i: int) -> str | None:
    return None if i == NO_CAPTION else f"photo number {i}"


def _files() -> list[range]:
    return [range(0, SPLIT), range(SPLIT, N_ITEMS)]


def _tar(items: range) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i in items:
            members = {f"sample{i:04d}.png": encoded(i)}
            if caption(i) is not None:
                members[f"sample{i:04d}.txt"] = caption(i).encode()
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _parquet(items: range) -> bytes:
    table = pa.table({"jpg": [encoded(i) for i in items], "text": [caption(i) for i in items]})
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def write_dataset(kind: str, root: str) -> tuple[SourceConfig, list[str]]:
    """Write the dataset as `kind` under `root`; return its source config and the 10 item ids."""
    if kind == "webdataset":
        for f, items in enumerate(_files()):
            storage.write_bytes(storage.join(root, f"part-{f}.tar"), _tar(items))
        storage.write_bytes(storage.join(root, "part-2.tar"), b"this is not a tar file" * 40)
        config = SourceConfig(kind=kind, uris=[storage.join(root, "part-{0..2}.tar")])
        return config, [f"part-{i // SPLIT}/sample{i:04d}" for i in range(N_ITEMS)]
    if kind == "parquet":
        for f, items in enumerate(_files()):
            storage.write_bytes(storage.join(root, f"part-{f}.parquet"), _parquet(items))
        storage.write_bytes(storage.join(root, "part-2.parquet"), b"PAR1 truncated")
        uris = [storage.join(root, f"part-{f}.parquet") for f in range(3)]
        config = SourceConfig(kind=kind, uris=uris, image_column="jpg", caption_column="text")
        return config, [
            f"part-{i // SPLIT}.parquet#{i % SPLIT if i < SPLIT else i - SPLIT}" for i in range(N_ITEMS)
        ]
    assert kind == "folder"
    for f, items in enumerate(_files()):
        folder = storage.join(root, f"folder-{f}")
        for i in items:
            storage.write_bytes(storage.join(folder, f"img-{i:04d}.png"), encoded(i))
        lines = [json.dumps({"file": f"img-{i:04d}.png", "caption": caption(i)}) for i in items]
        storage.write_text(storage.join(folder, "captions.jsonl"), "\n".join(lines))
    # folder-2 has images but no captions file: unreadable
    storage.write_bytes(storage.join(root, "folder-2", "img-0099.png"), encoded(0))
    config = SourceConfig(kind=kind, uris=[storage.join(root, f"folder-{f}") for f in range(3)])
    return config, [f"img-{i:04d}.png" for i in range(N_ITEMS)]


@pytest.fixture
def caption_dataset() -> SimpleNamespace:
    """The dataset's writer and what it holds (for expected values)."""
    return SimpleNamespace(
        write=write_dataset,
        photo=photo,
        caption=caption,
        n_items=N_ITEMS,
        bad_image=BAD_IMAGE,
        no_caption=NO_CAPTION,
    )
