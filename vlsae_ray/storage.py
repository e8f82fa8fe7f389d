"""One object-store layer for every stage: local paths, `file://` and `s3://` URIs.

A URI is a plain string. Local paths and `file://` URIs go to the filesystem; `s3://bucket/key`
goes to S3 or any S3-compatible server (SeaweedFS, MinIO, Ceph, GCS interop). The S3 endpoint
and credentials come from the standard AWS configuration: `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, `~/.aws/config`. With a custom
endpoint we use path-style addressing, which S3-compatible servers need.

Writes are whole-object and atomic: a local write goes to a temporary name in the same folder
and is renamed over the target; an S3 object of one part is one PUT, a larger one a multipart
upload (parts of `part_size()` bytes, `VLSAE_S3_PART_SIZE`), which S3 makes visible only when it
completes and which is aborted on failure. A reader never sees half an object, and a failure
halfway leaves what was there before. `write_stream` writes an object from a sequence of buffers
(a tensor's rows, say) holding at most one part of it in memory.

A prefix is a folder: `list_prefix("s3://b/models/clip")` lists the objects under `models/clip/`,
at any depth. Libraries that can only read a local folder get one from `local_folder`, which
copies an s3:// prefix into this machine's cache (`cache_dir`) once per version of its objects.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

# S3's limits: a part is 5 MiB to 5 GiB (the last may be smaller), an upload at most 10,000 parts.
MIN_PART_SIZE, MAX_PART_SIZE, MAX_PARTS = 5 * 2**20, 5 * 2**30, 10_000
PART_SIZE = 64 * 2**20  # a 128 GiB latent shard in 2048 parts; one part in memory at a time
PART_SIZE_ENV = "VLSAE_S3_PART_SIZE"


class StorageError(RuntimeError):
    """A URI that cannot be read or written, with what to do about it."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """`base/part/...` for any URI kind (no normalisation of the scheme)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        return Path(urlparse(uri).path)
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return Path(uri)


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"S3 URI {uri!r} has no bucket: write it as s3://BUCKET/KEY")
    return parsed.netloc, parsed.path.lstrip("/")


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@functools.cache
def _s3_client(endpoint: str | None):
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path" if endpoint else "auto"},
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
    )
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def s3_client():
    return _s3_client(s3_endpoint())


def _s3_call(uri: str, fn, **kwargs):
    """Run one S3 call and turn the errors a user can cause into one clear StorageError."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    try:
        return fn(**kwargs)
    except EndpointConnectionError as error:
        raise StorageError(
            f"cannot reach the S3 endpoint {s3_endpoint() or 'of AWS'} for {uri!r}: start the server "
            "or set AWS_ENDPOINT_URL to a reachable one"
        ) from error
    except NoCredentialsError as error:
        raise StorageError(
            f"no S3 credentials for {uri!r}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from error
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise StorageError(
                f"bucket {_split_s3(uri)[0]!r} of {uri!r} does not exist: create it or fix the URI"
            ) from error
        if code in ("NoSuchKey", "404", "NotFound"):
            raise FileNotFoundError(uri) from error
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(f"access to {uri!r} denied ({code}): check the S3 credentials") from error
        raise StorageError(f"S3 error {code or error} for {uri!r}") from error


def read_bytes(uri: str) -> bytes:
    """The whole object at `uri`; FileNotFoundError if there is none."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        response = _s3_call(uri, s3_client().get_object, Bucket=bucket, Key=key)
        return response["Body"].read()
    return _local_path(uri).read_bytes()


def read_into(uri: str, offset: int, buffer: bytearray | memoryview) -> None:
    """Fill the writable `buffer` with the object's bytes from `offset` on (a ranged GET on S3)."""
    view = memoryview(buffer).cast("B")
    size, filled = view.nbytes, 0
    if size == 0:
        return
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        byte_range = f"bytes={offset}-{offset + size - 1}"
        body = _s3_call(uri, s3_client().get_object, Bucket=bucket, Key=key, Range=byte_range)["Body"]
        for chunk in body.iter_chunks(2**20):
            if filled + len(chunk) > size:
                break
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
    else:
        with _local_path(uri).open("rb") as f:
            f.seek(offset)
            while filled < size and (n := f.readinto(view[filled:])):
                filled += n
    if filled != size:
        raise StorageError(
            f"{uri!r} does not hold bytes {offset}..{offset + size}: the object is truncated or not the"
            " one expected; write it again"
        )


def part_size() -> int:
    """Bytes per part of an S3 multipart upload: $VLSAE_S3_PART_SIZE, else PART_SIZE."""
    raw = os.environ.get(PART_SIZE_ENV, str(PART_SIZE))
    if not raw.isdigit() or not MIN_PART_SIZE <= int(raw) <= MAX_PART_SIZE:
        raise StorageError(
            f"{PART_SIZE_ENV}={raw!r} is not a part size S3 takes: set it to a number of bytes between"
            f" {MIN_PART_SIZE} (5 MiB) and {MAX_PART_SIZE} (5 GiB)"
        )
    return int(raw)


def write_bytes(uri: str, data: bytes | bytearray | memoryview) -> None:
    """Write the whole object at `uri` atomically (readers see the old or the new, never a part)."""
    write_stream(uri, [data])


def write_stream(uri: str, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
    """Write the concatenation of `chunks` as the object at `uri`, atomically, chunk by chunk.

    Locally the chunks go straight to the temporary file; to S3 they are packed into parts of
    `part_size()` bytes, so the write holds one part beside the caller's buffers.
    """
    if is_s3(uri):
        _write_s3(uri, chunks)
        return
    path = _local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parts(chunks: Iterable[bytes | bytearray | memoryview], size: int) -> Iterator[bytearray]:
    """The bytes of `chunks` regrouped into parts of `size` bytes; the last one shorter (or empty)."""
    part, filled = bytearray(size), 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view.nbytes:
            take = min(size - filled, view.nbytes)
            part[filled : filled + take] = view[:take]
            filled, view = filled + take, view[take:]
            if filled == size:
                yield part
                del part  # the caller has dropped it too: one part in memory at a time
                part, filled = bytearray(size), 0
    del part[filled:]  # in place: no second copy of the last part
    yield part


def _write_s3(uri: str, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
    """One PUT for an object of less than one part, else a multipart upload, aborted on failure."""
    bucket, key = _split_s3(uri)
    client, size = s3_client(), part_size()
    parts = _parts(chunks, size)
    first = next(parts)
    if len(first) < size:
        _s3_call(uri, client.put_object, Bucket=bucket, Key=key, Body=first)
        return
    upload_id = _s3_call(uri, client.create_multipart_upload, Bucket=bucket, Key=key)["UploadId"]
    try:
        done, body = [], first
        del first
        while body:  # the last part is empty when the size is a multiple of the part size
            if len(done) == MAX_PARTS:
                raise StorageError(
                    f"{uri!r} needs more than {MAX_PARTS} parts of {size} bytes, S3's limit: set"
                    f" {PART_SIZE_ENV} larger"
                )
            response = _s3_call(
                uri,
                client.upload_part,
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=len(done) + 1,
                Body=body,
            )
            # the part's checksum (botocore adds one by default), which completing the upload needs
            checksums = {name: value for name, value in response.items() if name.startswith("Checksum")}
            done.append({"PartNumber": len(done) + 1, "ETag": response["ETag"], **checksums})
            del body  # before the next part is allocated: one part in memory at a time
            body = next(parts, b"")
        _s3_call(
            uri,
            client.complete_multipart_upload,
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": done},
        )
    except BaseException:
        # no object appears; if even the abort fails, a bucket lifecycle rule collects the parts
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        try:
            _s3_call(uri, s3_client().head_object, Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        return True
    return _local_path(uri).exists()


def _local_version(stat: os.stat_result) -> str:
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def version(uri: str) -> str:
    """A string that changes whenever the object changes (S3 ETag; size and mtime on disk)."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return _s3_call(uri, s3_client().head_object, Bucket=bucket, Key=key)["ETag"].strip('"')
    return _local_version(_local_path(uri).stat())


def list_prefix(prefix: str) -> dict[str, str]:
    """{URI: its `version`} of every object under the folder `prefix`, at any depth, sorted by URI.

    A prefix with no objects, or a missing local folder, lists nothing; a missing bucket is a
    StorageError. On S3 this is one LIST request per 1000 objects, and the versions come with it.
    """
    if is_s3(prefix):
        bucket, key = _split_s3(prefix)
        folder = f"{key.strip('/')}/" if key.strip("/") else ""
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder)
        objects = _s3_call(prefix, lambda: [obj for page in pages for obj in page.get("Contents", [])])
        # a key ending in "/" is a folder marker some tools write, not a file
        found = {f"s3://{bucket}/{obj['Key']}": obj["ETag"].strip('"') for obj in objects}
        return {uri: found[uri] for uri in sorted(found) if not uri.endswith("/")}
    root, found = _local_path(prefix), {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            found[join(prefix, path.relative_to(root).as_posix())] = _local_version(path.stat())
    return dict(sorted(found.items()))


def cache_dir() -> Path:
    """This machine's cache of downloaded objects: $VLSAE_CACHE, else ~/.cache/vlsae."""
    return Path(os.environ.get("VLSAE_CACHE", Path.home() / ".cache" / "vlsae"))


def local_folder(prefix: str, skip_suffixes: tuple[str, ...] = ()) -> str:
    """A local folder holding the objects under `prefix`, for libraries that read only folders.

    A local URI is its own folder. An s3:// prefix is copied, without the objects whose names end
    in `skip_suffixes`, into `cache_dir()/folders/KEY`, KEY a hash of the endpoint, the prefix and
    every copied object's name and ETag: a cache hit costs one listing and no downloads, and a
    changed object makes a fresh copy. The copy is written to a temporary sibling folder and
    renamed into place, so loaders racing on one machine, or one killed midway, never leave a
    half-written folder under KEY.
    """
    if not is_s3(prefix):
        return str(_local_path(prefix))
    prefix = prefix.rstrip("/")
    objects = {
        uri[len(prefix) + 1 :]: etag
        for uri, etag in list_prefix(prefix).items()
        if not uri.endswith(skip_suffixes)
    }
    for name in objects:
        if any(part in ("", ".", "..") for part in name.split("/")):
            raise StorageError(f"object {name!r} under {prefix!r} has no safe local file name")
    key = hashlib.sha256(json.dumps([s3_endpoint(), prefix, objects]).encode()).hexdigest()[:16]
    target = cache_dir() / "folders" / key
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}."))
    try:
        for name in objects:
            uri, path = join(prefix, name), partial / name
            path.parent.mkdir(parents=True, exist_ok=True)
            bucket, object_key = _split_s3(uri)
            _s3_call(uri, s3_client().download_file, Bucket=bucket, Key=object_key, Filename=str(path))
        try:
            os.rename(partial, target)
        except OSError:
            if not target.is_dir():  # else another loader on this machine renamed its copy first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def delete(uri: str) -> None:
    """Remove one object; no error if it is already gone."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        _s3_call(uri, s3_client().delete_object, Bucket=bucket, Key=key)
        return
    _local_path(uri).unlink(missing_ok=True)


def check_writable(prefix: str) -> None:
    """Fail now, with a clear message, if `prefix` cannot be written (missing bucket, no endpoint).

    Jobs call this before any work starts so that a bad output URI costs nothing.
    """
    if is_s3(prefix):
        bucket, _ = _split_s3(prefix)
        try:
            _s3_call(prefix, s3_client().head_bucket, Bucket=bucket)
        except FileNotFoundError as error:  # HEAD has no body, so a missing bucket is a bare 404
            raise StorageError(
                f"bucket {bucket!r} of {prefix!r} does not exist: create it or fix the URI"
            ) from error
        return
    path = _local_path(prefix)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(f"cannot create the output folder {prefix!r}: {error.strerror}") from error
    if not os.access(path, os.W_OK):
        raise StorageError(f"the output folder {prefix!r} is not writable")


def local_path(uri: str) -> str | None:
    """The filesystem path of a local URI (None for s3://), for libraries that need a real file."""
    return None if is_s3(uri) else str(_local_path(uri))


def absolute(uri: str) -> str:
    """`uri` with a relative local path made absolute here, for processes that run elsewhere
    (Ray Train workers run in their own folder); s3:// URIs are returned as they are."""
    return uri if is_s3(uri) else str(_local_path(uri).absolute())
