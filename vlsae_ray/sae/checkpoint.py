"""The SAE checkpoint format: one safetensors file, or one file per latent shard plus an index.

Under a checkpoint folder URI, either form:

    sae.safetensors                         single file: every tensor of the saved state
    config.json                             the SAE config

    sae-00001-of-00004.<token>.safetensors  sharded: shard s of L holds rows [s·F/L, (s+1)·F/L) of the
                                            latent tensors; shard 0 also the others (b_dec_d, ...)
    sae.safetensors.index.json              sharded: the commit record (below)
    config.json                             a copy of the index's config, for readers

The saved state has the input scale folded in (`SparseAutoencoder.folded_state_dict`), and the
sharded form holds exactly the single file's tensors, split by rows. A latent tensor is one whose
shape suffix is f or fd (`W_enc_fd`, `b_enc_f`, `W_dec_fd`, `log_threshold_f`): its rows are
latents. Files are written by streaming each tensor's bytes (`storage.write_stream`), so a save
holds no second copy of the weights, and large files go to S3 in parts.

Committing a sharded save (`LatentShardedSAE.save`): each rank writes its shard under a fresh
token, so no committed file is ever overwritten; then shard 0's rank writes the index, which names
the files with their latent ranges, sizes and SHA-256 and carries the config. Until the index is
replaced a reader sees the previous checkpoint, whole; a save killed before it leaves stray shard
files, which the next save's clean-up deletes with the other files no longer named. A single-file
save writes `sae.safetensors` and `config.json` (in that order, as ever), then removes a sharded
save's index and files. Readers take the index if there is one, else the single file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import uuid
from collections.abc import Iterator

import torch

from vlsae_ray import storage

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
INDEX_FILE = "sae.safetensors.index.json"
INDEX_FORMAT = 1
SHARD_FILE = re.compile(r"sae-\d{5}-of-\d{5}\.[0-9a-f]+\.safetensors")
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def latent_tensor(name: str) -> bool:
    """Whether the tensor `name` has one row per latent (shape suffix f or fd)."""
    return name.rsplit("_", 1)[-1] in ("f", "fd")


def _bytes_of(tensor: torch.Tensor):
    """The bytes of a contiguous CPU tensor, as a writable buffer sharing its memory."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def _blocks(tensor: torch.Tensor) -> Iterator[memoryview]:
    """The bytes of `tensor` in blocks of one upload part: views of a contiguous CPU tensor, or
    copies made one at a time off a GPU."""
    flat = tensor.detach().contiguous().reshape(-1)
    step = max(1, storage.part_size() // flat.element_size())
    for start in range(0, flat.numel(), step):
        yield memoryview(_bytes_of(flat[start : start + step].cpu()))


def write_safetensors(uri: str, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
    """Stream `tensors` to `uri` as one safetensors file; its (size in bytes, SHA-256)."""
    header, offset = {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    digest = hashlib.sha256()

    def chunks():
        prefix = len(encoded).to_bytes(8, "little") + encoded
        for chunk in itertools.chain([prefix], *(_blocks(tensor) for tensor in tensors.values())):
            digest.update(chunk)
            yield chunk

    storage.write_stream(uri, chunks())
    return 8 + len(encoded) + offset, digest.hexdigest()


def _read_header(uri: str) -> tuple[dict, int]:
    """A safetensors file's header and the offset of its data."""
    size = bytearray(8)
    storage.read_into(uri, 0, size)
    length = int.from_bytes(size, "little")
    if length > 100 * 2**20:
        raise storage.StorageError(f"{uri!r} is not a safetensors file (header of {length} bytes)")
    header = bytearray(length)
    storage.read_into(uri, 8, header)
    return json.loads(header), 8 + length


def save_single(uri: str, state: dict[str, torch.Tensor], config_json: str) -> None:
    """The single-file form; it replaces a sharded checkpoint at `uri` once it is written."""
    write_safetensors(storage.join(uri, WEIGHTS_FILE), state)
    storage.write_text(storage.join(uri, CONFIG_FILE), config_json)
    _remove_unnamed(uri, keep={WEIGHTS_FILE})


def write_shard(
    uri: str, shard: int, shards: int, latents: tuple[int, int], state: dict[str, torch.Tensor]
) -> dict:
    """Write latent shard `shard` of `shards` (rows `latents` of the full SAE) under a fresh name.

    `state` is the shard's saved state; shard 0 keeps the tensors that are not latent tensors.
    Returns the shard's record for `commit_sharded`.
    """
    name = f"sae-{shard:05d}-of-{shards:05d}.{uuid.uuid4().hex[:12]}.safetensors"
    if shard:
        state = {key: tensor for key, tensor in state.items() if latent_tensor(key)}
    nbytes, sha256 = write_safetensors(storage.join(uri, name), state)
    return {"file": name, "latents": list(latents), "bytes": nbytes, "sha256": sha256}


def commit_sharded(uri: str, config_json: str, records: list[dict]) -> None:
    """Commit the shards of `records` (in shard order) by writing the index; then tidy up."""
    config = json.loads(config_json)
    index = {
        "format": INDEX_FORMAT,
        "n_latents": config["n_latents"],
        "latent_shards": len(records),
        "total_bytes": sum(record["bytes"] for record in records),
        "shards": records,
        "config": config,
    }
    storage.write_text(storage.join(uri, INDEX_FILE), json.dumps(index, indent=1))
    storage.write_text(storage.join(uri, CONFIG_FILE), config_json)
    _remove_unnamed(uri, keep={INDEX_FILE, *(record["file"] for record in records)})


def _remove_unnamed(uri: str, keep: set[str]) -> None:
    """Delete the checkpoint files under `uri` not in `keep`: an index first, as it names the others."""
    if INDEX_FILE not in keep:
        storage.delete(storage.join(uri, INDEX_FILE))
    folder = uri.rstrip("/") + "/"
    for file_uri in storage.list_prefix(uri):
        name = file_uri[len(folder) :]
        if name not in keep and (name == WEIGHTS_FILE or SHARD_FILE.fullmatch(name)):
            storage.delete(file_uri)


def _read_index(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_text(storage.join(uri, INDEX_FILE)))
    except FileNotFoundError:
        return None


def commit_uri(uri: str) -> str:
    """The file whose version is the checkpoint's: the index of a sharded one, else the weights."""
    index = storage.join(uri, INDEX_FILE)
    return index if storage.exists(index) else storage.join(uri, WEIGHTS_FILE)


def _contents(uri: str) -> tuple[dict, list[tuple[str, int, int]]]:
    """The config and the weight files with the latents each holds, [(file URI, first, end)]."""
    try:
        index = _read_index(uri)
        if index is not None:
            if index.get("format") != INDEX_FORMAT:
                raise ValueError(
                    f"{INDEX_FILE} at {uri!r} has format {index.get('format')!r}; this version reads"
                    f" format {INDEX_FORMAT}: load it with the vlsae-ray that wrote it"
                )
            files = [(storage.join(uri, s["file"]), *s["latents"]) for s in index["shards"]]
            return index["config"], files
        config = json.loads(storage.read_text(storage.join(uri, CONFIG_FILE)))
        if not storage.exists(storage.join(uri, WEIGHTS_FILE)):
            raise FileNotFoundError(storage.join(uri, WEIGHTS_FILE))
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no SAE checkpoint at {uri!r}: expected {CONFIG_FILE} and {WEIGHTS_FILE}, or {INDEX_FILE},"
            " in that folder"
        ) from error
    return config, [(storage.join(uri, WEIGHTS_FILE), 0, config["n_latents"])]


def read_config(uri: str) -> dict:
    """The config of the checkpoint at `uri`, as saved, without reading any weights."""
    return _contents(uri)[0]


def read(uri: str, latents: slice | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, saved state) of the checkpoint at `uri`, either form.

    With `latents` (a slice of latent indices, step 1) the latent tensors hold only those rows,
    read with ranged reads from the files that hold them; the other tensors are whole. Peak memory
    is the returned tensors: every file's bytes are read straight into them.
    """
    config, files = _contents(uri)
    n_latents = config["n_latents"]
    lo, hi, step = (latents or slice(None)).indices(n_latents)
    if step != 1 or lo >= hi:
        raise ValueError(
            f"latents={latents!r} selects no contiguous latents of the {n_latents}: pass slice(start, stop)"
            f" with 0 <= start < stop <= {n_latents}"
        )
    state: dict[str, torch.Tensor] = {}
    for file_uri, first, end in files:
        if first and (end <= lo or first >= hi):
            continue  # none of the rows wanted, and not shard 0 (which holds the other tensors)
        header, data_start = _read_header(file_uri)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (begin, _) = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            if not latent_tensor(name):
                state[name] = torch.empty(shape, dtype=dtype)
                storage.read_into(file_uri, data_start + begin, _bytes_of(state[name]))
                continue
            a, b = max(first, lo), min(end, hi)
            if a >= b:
                continue
            out = state.setdefault(name, torch.empty([hi - lo, *shape[1:]], dtype=dtype))
            row_bytes = out[0].numel() * out.element_size()
            storage.read_into(
                file_uri, data_start + begin + (a - first) * row_bytes, _bytes_of(out[a - lo : b - lo])
            )
    return config, state
