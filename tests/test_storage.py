import collections
import contextlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vlsae_ray import storage


def test_round_trip_and_delete(store_root):
    a, b = storage.join(store_root, "x", "a.bin"), storage.join(store_root, "x", "sub", "b.bin")
    storage.write_bytes(a, b"alpha")
    storage.write_text(b, "beta")
    assert storage.read_bytes(a) == b"alpha"
    assert storage.read_text(b) == "beta"
    assert storage.exists(a) and not storage.exists(storage.join(store_root, "nope"))
    storage.delete(a)
    assert not storage.exists(a)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(a)


def test_overwrite_replaces_whole_object(store_root):
    uri = storage.join(store_root, "o.bin")
    storage.write_bytes(uri, b"1" * 1000)
    storage.write_bytes(uri, b"2" * 10)
    assert storage.read_bytes(uri) == b"2" * 10


def test_local_write_failure_keeps_old_content(tmp_path, monkeypatch):
    uri = str(tmp_path / "f.bin")
    storage.write_bytes(uri, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes(uri, b"new")
    monkeypatch.undo()
    assert storage.read_bytes(uri) == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left behind


def test_file_uri_is_local(tmp_path):
    storage.write_text(f"file://{tmp_path}/t.txt", "hi")
    assert (tmp_path / "t.txt").read_text() == "hi"


def test_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' .* does not exist"):
        storage.check_writable("s3://no-such-bucket/run")
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.write_bytes("s3://no-such-bucket/a", b"x")


def test_unreachable_endpoint_is_a_clear_error(s3_server, monkeypatch):
    from vlsae_ray.local_stack import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint"):
        storage.read_bytes("s3://vlsae-test/a")


def test_bad_uris():
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        storage.read_bytes("gopher://x/y")
    with pytest.raises(storage.StorageError, match="no bucket"):
        storage.read_bytes("s3:///key")


def test_version_changes_with_the_object(store_root):
    uri = storage.join(store_root, "v.bin")
    storage.write_bytes(uri, b"one")
    first = storage.version(uri)
    assert storage.version(uri) == first
    storage.write_bytes(uri, b"two!")
    assert storage.version(uri) != first


@contextlib.contextmanager
def s3_event_handler(event: str, handler):
    """`handler` registered for the S3 client's botocore `event` inside the block."""
    events = storage.s3_client().meta.events
    events.register(event, handler)
    try:
        yield
    finally:
        events.unregister(event, handler)


@contextlib.contextmanager
def s3_calls():
    """Counts the S3 API calls made inside the block, by operation name."""
    calls = collections.Counter()

    def count(model, **_):
        calls[model.name] += 1

    with s3_event_handler("before-call.s3", count):
        yield calls


def test_list_prefix_lists_a_folder_at_any_depth(store_root):
    folder = storage.join(store_root, "m")
    inside = [storage.join(folder, name) for name in ("z.bin", "a.json", "sub/b.bin", "sub/deeper/c")]
    for uri in [*inside, storage.join(store_root, "m-2", "x"), storage.join(store_root, "top")]:
        storage.write_bytes(uri, uri.encode())
    listed = storage.list_prefix(folder)
    assert list(listed) == sorted(inside)  # not m-2/x, not the sibling file
    assert listed == {uri: storage.version(uri) for uri in inside}
    assert storage.list_prefix(folder + "/") == listed
    assert storage.list_prefix(storage.join(store_root, "nothing-here")) == {}


def test_list_prefix_pages_through_s3(s3_root):
    uris = [storage.join(s3_root, f"{i:04d}") for i in range(23)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda uri: storage.write_bytes(uri, b"x"), uris))

    # pages of 10 objects, not the server's 1000 (1003 objects would take 30 s of PUTs)
    def pages_of_10(params, **_):
        params["MaxKeys"] = 10

    with s3_event_handler("before-parameter-build.s3.ListObjectsV2", pages_of_10), s3_calls() as calls:
        listed = storage.list_prefix(s3_root)
    assert list(listed) == uris
    assert calls == {"ListObjectsV2": 3}


def test_list_prefix_of_a_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' .* does not exist"):
        storage.list_prefix("s3://no-such-bucket/models")


FOLDER = {"config.json": b"{}", "model.safetensors": b"w" * 100_000, "sub/vocab.txt": b"a\nb"}


def write_folder(prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        storage.write_bytes(storage.join(prefix, name), data)


def folder_files(folder: str) -> dict[str, bytes]:
    root = Path(folder)
    return {
        path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()
    }


def test_local_folder_of_a_local_uri_is_itself(tmp_path):
    assert storage.local_folder(f"file://{tmp_path}") == str(tmp_path)
    assert storage.local_folder(str(tmp_path / "m")) == str(tmp_path / "m")


def test_local_folder_downloads_an_s3_folder_once(s3_root, tmp_path, monkeypatch):
    monkeypatch.setenv("VLSAE_CACHE", str(tmp_path / "cache"))
    prefix = storage.join(s3_root, "model")
    write_folder(prefix, FOLDER)
    with s3_calls() as first:
        folder = storage.local_folder(prefix)
    assert folder_files(folder) == FOLDER and first["ListObjectsV2"] == 1 and first["GetObject"] >= 3
    with s3_calls() as second:
        assert storage.local_folder(prefix + "/") == folder
    assert second == {"ListObjectsV2": 1}  # a cache hit: one listing, no downloads

    small = storage.local_folder(prefix, skip_suffixes=(".safetensors",))
    assert small != folder and folder_files(small) == {
        k: v for k, v in FOLDER.items() if k != "model.safetensors"
    }

    storage.write_bytes(storage.join(prefix, "config.json"), b'{"changed": 1}')  # a new ETag
    changed = storage.local_folder(prefix)
    assert changed not in (folder, small) and folder_files(changed)["config.json"] == b'{"changed": 1}'
    assert folder_files(folder) == FOLDER  # the old copy is left as it was
    assert sorted(path.name for path in (tmp_path / "cache" / "folders").iterdir()) == sorted(
        Path(path).name for path in (folder, small, changed)
    )


def test_local_folder_failing_midway_leaves_nothing_half_written(s3_root, tmp_path, monkeypatch):
    """The second download fails: injected, since the real loopback server never drops a connection."""
    monkeypatch.setenv("VLSAE_CACHE", str(tmp_path / "cache"))
    prefix = storage.join(s3_root, "model")
    write_folder(prefix, FOLDER)
    client, downloads = storage.s3_client(), []
    real_download = client.download_file

    def download_then_fail(**kwargs):
        if downloads:
            raise ConnectionResetError("connection lost")
        downloads.append(kwargs["Key"])
        real_download(**kwargs)

    monkeypatch.setattr(client, "download_file", download_then_fail)
    with pytest.raises(ConnectionResetError):
        storage.local_folder(prefix)
    assert downloads and list((tmp_path / "cache" / "folders").iterdir()) == []
    monkeypatch.setattr(client, "download_file", real_download)
    assert folder_files(storage.local_folder(prefix)) == FOLDER


def test_local_folder_racing_loaders_share_one_copy(s3_root, tmp_path, monkeypatch):
    monkeypatch.setenv("VLSAE_CACHE", str(tmp_path / "cache"))
    prefix = storage.join(s3_root, "model")
    write_folder(prefix, FOLDER)
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: storage.local_folder(prefix), range(4)))
    assert len(set(folders)) == 1 and folder_files(folders[0]) == FOLDER
    assert [path.name for path in (tmp_path / "cache" / "folders").iterdir()] == [Path(folders[0]).name]


MiB = 2**20


@pytest.fixture
def small_parts(monkeypatch):
    """S3's smallest part size, so a test object of a few MiB goes up in parts."""
    monkeypatch.setenv(storage.PART_SIZE_ENV, str(storage.MIN_PART_SIZE))
    return storage.MIN_PART_SIZE


@pytest.mark.parametrize("size", [5 * MiB - 1, 5 * MiB, 10 * MiB, 12 * MiB + 3])
def test_large_objects_go_up_in_parts_and_read_back_whole(s3_root, small_parts, size):
    data = os.urandom(size)
    uri = storage.join(s3_root, "big.bin")
    # uneven chunks, one of them larger than a part, as a tensor's row blocks would come
    cuts = [cut for cut in (0, 7, 3 * MiB, 9 * MiB) if cut < size] + [size]
    chunks = [memoryview(data)[a:b] for a, b in itertools.pairwise(cuts)]
    with s3_calls() as calls:
        storage.write_stream(uri, chunks)
    assert storage.read_bytes(uri) == data
    parts = -(-size // small_parts) if size >= small_parts else 0
    assert calls["UploadPart"] == parts
    assert calls["PutObject"] == (0 if parts else 1)
    middle = bytearray(MiB)
    storage.read_into(uri, size // 2, middle)  # a ranged read
    assert bytes(middle) == data[size // 2 : size // 2 + MiB]


def test_failed_multipart_upload_is_aborted_and_keeps_the_old_object(s3_root, small_parts):
    uri = storage.join(s3_root, "big.bin")
    storage.write_bytes(uri, b"old")

    def chunks():
        yield os.urandom(12 * MiB)  # two parts go up, then the writer fails
        raise OSError("the writer died")

    with pytest.raises(OSError, match="the writer died"), s3_calls() as calls:
        storage.write_stream(uri, chunks())
    assert calls["UploadPart"] == 2 and calls["AbortMultipartUpload"] == 1
    assert storage.read_bytes(uri) == b"old"
    bucket, key = uri[len("s3://") :].split("/", 1)
    pending = storage.s3_client().list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
    assert pending == []


def test_local_stream_write_and_ranged_read(tmp_path):
    uri = str(tmp_path / "f.bin")
    storage.write_stream(uri, [b"ab", memoryview(b"cdef"), bytearray(b"g")])
    assert storage.read_bytes(uri) == b"abcdefg"
    out = bytearray(3)
    storage.read_into(uri, 2, out)
    assert out == b"cde"
    with pytest.raises(storage.StorageError, match="truncated"):
        storage.read_into(uri, 5, bytearray(4))


@pytest.mark.parametrize("value", ["1000", "5MiB", str(6 * 2**30)])
def test_bad_part_size_names_the_variable(s3_root, monkeypatch, value):
    monkeypatch.setenv(storage.PART_SIZE_ENV, value)
    with pytest.raises(storage.StorageError, match=f"VLSAE_S3_PART_SIZE='{value}'.*between 5242880"):
        storage.write_bytes(storage.join(s3_root, "x"), b"x")
