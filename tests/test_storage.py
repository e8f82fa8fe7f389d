import os

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
