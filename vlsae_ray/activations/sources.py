"""Image-caption sources: each item has a stable id, a caption, and an image read on demand.

Generated sources make their items: `world` is the built-in ground-truth concept world
(`vlsae_ray.world`; every item also carries its concept labels); `package_photos` uses the real
photos that ship inside scikit-image, scikit-learn and matplotlib (no download), enlarged to a few
thousand items by seeded random crops and flips. Their image is a pure function of the item id.

File sources are read through `vlsae_ray.storage` (local path, file://, s3://), file by file in
the order of `source.uris`:
- webdataset: .tar files whose members are grouped into samples by basename (`KEY.jpg`,
  `KEY.txt`); item id `TARNAME/KEY` (TARNAME without `.tar`).
- parquet: rows with encoded image bytes (or a `{"bytes": ...}` struct, as Hugging Face datasets
  store images) and a caption; item id `FILENAME#ROW`.
- folder: a captions file (`captions.jsonl` or `.csv`) listing `file` and `caption`; the images
  are files of that folder; item id the file name. Only listed files are items.

`list_items` lists every item once, in a fixed order (file after file, member after member), so
item i always comes i-th and a rerun puts it in the same shard. A source file that cannot be read
is reported in the listing, never silently dropped; `read_images` returns, per item, its image or
the reason it has none (a corrupt or missing image).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import random
import re
import tarfile
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import NamedTuple

import numpy as np
from PIL import Image

from vlsae_ray import storage
from vlsae_ray.config import ConfigError, SourceConfig
from vlsae_ray.world import generate_item

log = logging.getLogger(__name__)

_WORLD_ID = re.compile(r"world-(?P<split>\w+)-s(?P<seed>\d+)-(?P<index>\d+)")

# name -> (loader, caption); captions say what a person sees in the photo.
_PHOTOS = {
    "astronaut": ("skimage:astronaut", "a photo of an astronaut in a space suit"),
    "coffee": ("skimage:coffee", "a photo of a cup of coffee"),
    "chelsea": ("skimage:chelsea", "a photo of a cat"),
    "rocket": ("skimage:rocket", "a photo of a rocket on a launch pad"),
    "hubble": ("skimage:hubble_deep_field", "a photo of galaxies in deep space"),
    "cells": ("skimage:immunohistochemistry", "a microscope photo of stained cells"),
    "retina": ("skimage:retina", "a photo of a human retina"),
    "colorwheel": ("skimage:colorwheel", "a colour wheel"),
    "camera": ("skimage:camera", "a black and white photo of a man with a camera"),
    "coins": ("skimage:coins", "a black and white photo of coins"),
    "moon": ("skimage:moon", "a black and white photo of the moon's surface"),
    "brick": ("skimage:brick", "a black and white photo of a brick wall"),
    "grass": ("skimage:grass", "a black and white photo of grass"),
    "gravel": ("skimage:gravel", "a black and white photo of gravel"),
    "text": ("skimage:text", "a photo of printed text"),
    "china": ("sklearn:china.jpg", "a photo of a chinese temple"),
    "flower": ("sklearn:flower.jpg", "a photo of a flower"),
    "grace_hopper": ("matplotlib:grace_hopper.jpg", "a portrait photo of a woman in uniform"),
}


@functools.cache
def _photo(name: str) -> Image.Image:
    library, key = _PHOTOS[name][0].split(":")
    if library == "skimage":
        import skimage.data

        array = getattr(skimage.data, key)()
    elif library == "sklearn":
        from sklearn.datasets import load_sample_image

        array = load_sample_image(key)
    else:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(key) as f:
            return Image.open(f).convert("RGB")
    return Image.fromarray(np.asarray(array)).convert("RGB")


def package_photo_items(n_items: int, seed: int = 0) -> list[dict]:
    """`n_items` items cycling over the package photos; item i is crop i of its photo."""
    names = sorted(_PHOTOS)
    return [
        {
            "id": f"{names[i % len(names)]}/{seed}-{i // len(names)}",
            "caption": _PHOTOS[names[i % len(names)]][1],
        }
        for i in range(n_items)
    ]


class Item(NamedTuple):
    """One image-caption item and where its image is."""

    id: str
    caption: str | None  # None: the source has no caption for it
    location: str  # the source file (tar, parquet) or folder it is read from; "" when generated
    key: str  # tar: image member ("" if the sample has none); parquet: row; folder: file name


class Listing(NamedTuple):
    items: list[Item]
    unreadable: dict[str, str]  # source file URI -> why it could not be read (its items are unknown)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# What PIL, tarfile, pyarrow, json and csv raise for a file that is not what it claims to be.
_BAD_FILE = (
    OSError,
    EOFError,
    SyntaxError,
    ValueError,
    KeyError,
    csv.Error,
    tarfile.TarError,
    Image.DecompressionBombError,
)


def expand_uris(uris: list[str]) -> list[str]:
    """Each URI with its `{a..b}` ranges expanded (zero-padded to the width of `a`), then its globs,
    in order.

    A glob is a URI with `*` (any run of characters but `/`) or `?` (one such character) in any
    path segment; it becomes the files and folders it matches, sorted, found by listing the
    store below its last plain folder. A glob that matches nothing is an error.
    """
    out = []
    for uri in uris:
        match = re.search(r"\{(\d+)\.\.(\d+)\}", uri)
        if match is None:
            out.extend(_glob(uri) if re.search(r"[*?]", uri) else [uri])
            continue
        first, last = match.groups()
        if int(last) < int(first):
            raise ValueError(f"empty range {match.group(0)!r} in source URI {uri!r}: write {{low..high}}")
        numbers = [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
        out.extend(expand_uris([uri[: match.start()] + n + uri[match.end() :] for n in numbers]))
    return out


def _glob(pattern: str) -> list[str]:
    """The files and folders `pattern` matches, sorted: the objects under its last plain folder,
    each cut to as many path segments as the pattern has below that folder."""
    cut = pattern.rfind("/", 0, re.search(r"[*?]", pattern).start())
    folder = {-1: ".", 0: "/"}.get(cut, pattern[:cut])  # -1: a relative pattern, 0: one under /
    rest = pattern[cut + 1 :]
    regex = re.compile("".join({"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c)) for c in rest))
    matches = set()
    for uri in storage.list_prefix(folder):
        candidate = "/".join(uri[len(folder.rstrip("/")) + 1 :].split("/")[: rest.count("/") + 1])
        if regex.fullmatch(candidate):
            matches.add(candidate if cut == -1 else storage.join(folder, candidate))
    if not matches:
        raise ValueError(f"source URI pattern {pattern!r} matches no file or folder")
    return sorted(matches)


def list_items(config: SourceConfig) -> Listing:
    """Every item of the source once, in a fixed order (item i always comes i-th)."""
    if config.kind == "world":
        world = (generate_item(i, split=config.split, seed=config.seed) for i in range(config.n_items))
        return Listing([Item(item.id, item.caption, "", "") for item in world], {})
    if config.kind == "package_photos":
        photos = package_photo_items(config.n_items, config.seed)
        return Listing([Item(item["id"], item["caption"], "", "") for item in photos], {})
    lister = {"webdataset": _list_tar, "parquet": _list_parquet, "folder": _list_folder}[config.kind]
    items: list[Item] = []
    unreadable: dict[str, str] = {}
    for uri in expand_uris(config.uris):
        if config.n_items is not None and len(items) >= config.n_items:
            break
        try:
            items.extend(lister(uri, config))
        except ConfigError:
            raise
        except (storage.StorageError, *_BAD_FILE) as error:
            unreadable[uri] = f"{type(error).__name__}: {error}"
            log.warning("source file %s cannot be read, its items are skipped: %s", uri, unreadable[uri])
    items = items[: config.n_items]
    seen: dict[str, str] = {}
    for item in items:
        if item.id in seen:
            raise ValueError(
                f"item id {item.id!r} occurs in both {seen[item.id]!r} and {item.location!r}: item ids "
                "must be unique, so give the source files distinct names"
            )
        seen[item.id] = item.location
    return Listing(items, unreadable)


def source_items(config: SourceConfig) -> list[dict]:
    """The source's items as {"id", "caption"}, in their fixed order."""
    return [{"id": item.id, "caption": item.caption} for item in list_items(config).items]


def _name(uri: str) -> str:
    return PurePosixPath(uri.rstrip("/")).name


@functools.lru_cache(maxsize=1)
def _remote_bytes(uri: str, version: str) -> bytes:
    # consecutive shards of one worker often come from the same remote file: fetch it once
    return storage.read_bytes(uri)


def _file_bytes(uri: str) -> io.BytesIO:
    return io.BytesIO(
        _remote_bytes(uri, storage.version(uri)) if storage.is_s3(uri) else storage.read_bytes(uri)
    )


def _open_tar(uri: str) -> tarfile.TarFile:
    path = storage.local_path(uri)
    # on disk, tarfile seeks from header to header; from S3 the whole file comes in one GET
    return tarfile.open(path) if path else tarfile.open(fileobj=_file_bytes(uri))


def _list_tar(uri: str, config: SourceConfig) -> list[Item]:
    stem = _name(uri).removesuffix(".tar")
    samples: dict[str, dict] = {}  # webdataset key -> {"image": member, "caption": text}, in tar order
    with _open_tar(uri) as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            stem_part, dot, extension = base.partition(".")
            key = f"{directory}/{stem_part}" if directory else stem_part
            sample = samples.setdefault(key, {"image": "", "caption": None})
            extension = f"{dot}{extension}".lower()
            if extension in IMAGE_EXTENSIONS and not sample["image"]:
                sample["image"] = member.name
            elif extension == ".txt":
                sample["caption"] = tar.extractfile(member).read().decode("utf-8").strip() or None
    return [Item(f"{stem}/{key}", sample["caption"], uri, sample["image"]) for key, sample in samples.items()]


def _parquet_file(uri: str):
    import pyarrow.parquet as pq

    return pq.ParquetFile(_file_bytes(uri))


def _list_parquet(uri: str, config: SourceConfig) -> list[Item]:
    parquet = _parquet_file(uri)
    columns = parquet.schema_arrow.names
    for column in (config.image_column, config.caption_column):
        if column not in columns:
            raise ConfigError(
                f"parquet file {uri!r} has no column {column!r} (columns: {', '.join(columns)}); "
                "set source.image_column and source.caption_column"
            )
    captions = parquet.read(columns=[config.caption_column]).column(0).to_pylist()
    name = _name(uri)
    return [Item(f"{name}#{row}", caption or None, uri, str(row)) for row, caption in enumerate(captions)]


def _list_folder(uri: str, config: SourceConfig) -> list[Item]:
    text = storage.read_text(storage.join(uri, config.captions))
    if config.captions.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if rows and "file" not in rows[0]:
        raise ConfigError(
            f"captions file {storage.join(uri, config.captions)!r} has no 'file' field: each entry needs "
            "'file' (an image file name in the folder) and 'caption'"
        )
    return [Item(row["file"], row.get("caption") or None, uri, row["file"]) for row in rows]


class BadInputError(ValueError):
    """Bad input met with `fail_fast: true`."""


def read_images(config: SourceConfig, items: list[Item]) -> Iterator[Image.Image | str]:
    """Each item's RGB image, or why it has none (a corrupt or missing image), in order.

    Items of one source file are read together, so a tar or parquet file is read once per call.
    """
    encoded = _encoded_images(config, items)
    for item in items:
        data = encoded.get(item.id)
        if isinstance(data, str):
            yield data
            continue
        try:
            image = load_image(item.id) if data is None else Image.open(io.BytesIO(data))
            image.load()  # decode now: PIL is lazy, and a truncated file fails only here
            yield image.convert("RGB")
        except _BAD_FILE as error:
            yield f"corrupt image ({type(error).__name__})"  # the message may name a BytesIO object


def _encoded_images(config: SourceConfig, items: list[Item]) -> dict[str, bytes | str]:
    """item id -> encoded image bytes, or why there are none; generated items are absent."""
    out: dict[str, bytes | str] = {}
    locations = dict.fromkeys(item.location for item in items if item.location)
    for location in locations:
        mine = [item for item in items if item.location == location]
        try:
            if config.kind == "webdataset":
                with _open_tar(location) as tar:
                    for item in mine:
                        data = tar.extractfile(item.key).read() if item.key else "no image in the sample"
                        out[item.id] = data
            elif config.kind == "parquet":
                images = _parquet_file(location).read(columns=[config.image_column]).column(0)
                for item in mine:
                    value = images[int(item.key)].as_py()
                    value = value.get("bytes") if isinstance(value, dict) else value
                    out[item.id] = value if value else "no image bytes in the row"
            else:
                for item in mine:
                    try:
                        out[item.id] = storage.read_bytes(storage.join(location, item.key))
                    except FileNotFoundError:
                        out[item.id] = "image file is missing"
        except (storage.StorageError, *_BAD_FILE) as error:
            # listed before, unreadable now: its items are bad, and the rest of the shard goes on
            why = f"source file {location} unreadable ({type(error).__name__}: {error})"
            for item in mine:
                out.setdefault(item.id, why)
    return out


def world_labels(item_id: str) -> dict[str, str] | None:
    """The ground-truth concept labels of a world item (None for other sources)."""
    match = _WORLD_ID.fullmatch(item_id)
    if match is None:
        return None
    return _world_item(match).labels


def _world_item(match: re.Match):
    return generate_item(int(match["index"]), split=match["split"], seed=int(match["seed"]))


def load_image(item_id: str) -> Image.Image:
    """The image of any source's item id."""
    if match := _WORLD_ID.fullmatch(item_id):
        return _world_item(match).image
    # package photos: a seeded crop (40-100% of the short side) and flip
    name, crop = item_id.split("/")
    if name not in _PHOTOS:
        raise KeyError(f"unknown package photo {name!r} in item id {item_id!r}")
    photo = _photo(name)
    rng = random.Random(f"{name}/{crop}")
    width, height = photo.size
    side = int(min(width, height) * rng.uniform(0.4, 1.0))
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    image = photo.crop((left, top, left + side, top + side))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image
