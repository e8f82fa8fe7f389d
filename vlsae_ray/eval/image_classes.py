"""A user's labelled images for zero-shot classification: a folder or a parquet file, and a
class-names file.

    classes.txt           one class name per line; class i is line i (blank lines are skipped)
    FOLDER/NAME/*.jpg     a folder: one subfolder per class, named as in the class-names file
                          (torchvision's ImageFolder layout); .jpg, .jpeg, .png or .webp images
    FILE.parquet          a parquet file: a column of encoded image bytes and a label column
                          holding each row's class name, or its 0-based index in the class names

All paths are `vlsae_ray.storage` URIs (local, file://, s3://). Anything that does not fit
(unknown class, missing column, unreadable image, no images at all) is an error naming the item,
since a silently skipped image would change the accuracy.
"""

from __future__ import annotations

import io
from typing import NamedTuple

from PIL import Image

from vlsae_ray import storage
from vlsae_ray.activations.sources import IMAGE_EXTENSIONS
from vlsae_ray.config import ConfigError


class LabelledImages(NamedTuple):
    ids: list[str]  # a folder's relative file paths, a parquet file's "FILE#ROW"
    images: list[Image.Image]  # RGB
    labels: list[int]  # index into class_names
    class_names: list[str]


def read_class_names(uri: str) -> list[str]:
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise ConfigError(f"class-names file {uri!r} does not exist") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) < 2:
        raise ConfigError(
            f"class-names file {uri!r} has {len(names)} class name(s); zero-shot needs two or more"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"class-names file {uri!r} lists {repeated} more than once")
    return names


def read_labelled_images(
    images: str, classes: str, image_column: str = "image", label_column: str = "label"
) -> LabelledImages:
    """The images under `images` (a folder or a .parquet file) with their class indices."""
    names = read_class_names(classes)
    if images.endswith(".parquet"):
        ids, encoded, labels = _parquet(images, names, image_column, label_column)
    else:
        ids, encoded, labels = _folder(images, names)
    if not ids:
        raise ConfigError(f"no images found in {images!r}")
    return LabelledImages(
        ids, [_decode(id_, data) for id_, data in zip(ids, encoded, strict=True)], labels, names
    )


def _folder(uri: str, names: list[str]) -> tuple[list[str], list[bytes], list[int]]:
    index = {name: i for i, name in enumerate(names)}
    ids, encoded, labels = [], [], []
    for file_uri in storage.list_prefix(uri):
        relative = file_uri[len(uri.rstrip("/")) + 1 :]
        if not relative.lower().endswith(IMAGE_EXTENSIONS):
            continue
        folder, _, _ = relative.rpartition("/")
        if folder not in index:
            where = f"in subfolder {folder!r}" if folder else "outside any class subfolder"
            raise ConfigError(
                f"image {relative!r} of {uri!r} is {where}, which is not a class of the class-names file: "
                "put each image in a subfolder named after its class"
            )
        ids.append(relative)
        encoded.append(storage.read_bytes(file_uri))
        labels.append(index[folder])
    return ids, encoded, labels


def _parquet(uri: str, names: list[str], image_column: str, label_column: str):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except FileNotFoundError:
        raise ConfigError(f"images file {uri!r} does not exist") from None
    missing = [column for column in (image_column, label_column) if column not in table.column_names]
    if missing:
        raise ConfigError(
            f"parquet file {uri!r} has no column {missing[0]!r} (columns: {', '.join(table.column_names)}); "
            "set zero_shot.image_column and zero_shot.label_column"
        )
    index = {name: i for i, name in enumerate(names)}
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    ids, encoded, labels = [], [], []
    rows = zip(table.column(image_column).to_pylist(), table.column(label_column).to_pylist(), strict=True)
    for row, (image, label) in enumerate(rows):
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
            labels.append(label)
        elif isinstance(label, str) and label in index:
            labels.append(index[label])
        else:
            raise ConfigError(
                f"row {row} of {uri!r} has label {label!r}: neither a class of the class-names file nor "
                f"an index below {len(names)}"
            )
        ids.append(f"{name}#{row}")
        encoded.append(image.get("bytes") if isinstance(image, dict) else image)
    return ids, encoded, labels


def _decode(id_: str, data: bytes | None) -> Image.Image:
    if not data:
        raise ConfigError(f"image {id_!r} has no bytes")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # PIL decodes lazily: a truncated file fails only here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ConfigError(f"image {id_!r} cannot be read ({type(error).__name__}: {error})") from None
    return image.convert("RGB")
