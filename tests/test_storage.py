"""Storage on a local directory and on a real S3-compatible server (SeaweedFS) on loopback."""

from __future__ import annotations

import os
import pickle
import socket
import time

import psutil
import pyarrow as pa
import pytest

from chameleon.data import storage
from chameleon.data.storage import (
    BucketNotFoundError,
    LocalStore,
    S3Store,
    StoreAccessError,
    StoreKeyError,
    StoreUnavailableError,
    open_store,
    validate_key,
)
from chameleon.dev.s3server import LocalS3Server, S3ServerError


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.job)])  # s3: the job tier
def store(request):
    return request.getfixturevalue(f"{request.param}_store")


def _table() -> pa.Table:
    return pa.table({"user_id": ["u1", "u2"], "emb": [[0.5, 1.0], [2.0, -1.0]], "n": [1, 2]})


# -- both backends -------------------------------------------------------------------------------


def test_round_trips(store):
    store.put_bytes("raw/blob.bin", b"\x00\x01\xff")
    store.put_text("notes/a.txt", "héllo\n")
    store.put_json("cfg/run.json", {"a": [1, 2], "b": "ü"})
    store.put_parquet("data/part-0.parquet", _table())

    assert store.get_bytes("raw/blob.bin") == b"\x00\x01\xff"
    assert store.get_text("notes/a.txt") == "héllo\n"
    assert store.get_json("cfg/run.json") == {"a": [1, 2], "b": "ü"}
    assert store.get_parquet("data/part-0.parquet").equals(_table())
    store.put_bytes("raw/blob.bin", b"new")  # overwrite
    assert store.get_bytes("raw/blob.bin") == b"new"


def test_missing_key_names_full_uri(store):
    with pytest.raises(StoreKeyError, match="no such key") as info:
        store.get_bytes("runs/nope/manifest.json")
    assert isinstance(info.value, FileNotFoundError)
    assert store.uri.rstrip("/") + "/runs/nope/manifest.json" in str(info.value)


def test_exists_and_delete(store):
    assert not store.exists("a/b")
    store.put_bytes("a/b", b"1")
    assert store.exists("a/b")
    assert not store.exists("a")  # a "folder" is not a key
    store.delete("a/b")
    assert not store.exists("a/b")
    store.delete("a/b")  # deleting a missing key is fine, as in S3


def test_list_is_sorted_recursive_relative(store):
    assert store.list() == []
    for key in ["runs/r2/x.json", "runs/r1/b/c.bin", "runs/r1/a.json", "runs10/z", "latest"]:
        store.put_bytes(key, b"x")
    assert store.list() == ["latest", "runs/r1/a.json", "runs/r1/b/c.bin", "runs/r2/x.json", "runs10/z"]
    assert store.list("runs/") == ["runs/r1/a.json", "runs/r1/b/c.bin", "runs/r2/x.json"]
    assert store.list("runs") == ["runs/r1/a.json", "runs/r1/b/c.bin", "runs/r2/x.json", "runs10/z"]
    assert store.list("runs/r1/") == ["runs/r1/a.json", "runs/r1/b/c.bin"]
    assert store.list("nothing/") == []


def test_child_is_a_view_below_the_root(store):
    child = store.child("runs/r1")
    child.put_json("manifest.json", {"ok": True})
    assert store.get_json("runs/r1/manifest.json") == {"ok": True}
    assert child.list() == ["manifest.json"]
    assert child.uri == store.uri.rstrip("/") + "/runs/r1"
    assert store.child("runs/").child("r1").get_json("manifest.json") == {"ok": True}


def test_sibling_prefixes_do_not_leak(store):
    store.child("ab").put_bytes("x", b"1")
    assert store.child("a").list() == []


@pytest.mark.parametrize(
    "key",
    ["../x", "a/../../x", "/abs", "a//b", "a/", "./a", "a/./b", "..", "a\\b", "a\x00b", "a\nb", "a\x7fb", ""],
)
def test_unsafe_keys_are_rejected(store, key):
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.get_bytes(key)
    with pytest.raises(ValueError):
        store.exists(key)


@pytest.mark.parametrize("prefix", ["../", "/abs", "a//", "a/../"])
def test_unsafe_prefixes_are_rejected(store, prefix):
    with pytest.raises(ValueError):
        store.list(prefix)
    with pytest.raises(ValueError):
        store.child(prefix)


def test_validate_key_reasons():
    with pytest.raises(ValueError, match="'..' segment"):
        validate_key("../etc/passwd")
    with pytest.raises(ValueError, match="absolute"):
        validate_key("/etc/passwd")
    with pytest.raises(ValueError, match="backslash"):
        validate_key("a\\b")
    with pytest.raises(ValueError, match="empty path segment"):
        validate_key("a//b")
    with pytest.raises(ValueError, match="control character"):
        validate_key("a\tb")
    # Ids with the characters schema.py allows are fine.
    assert validate_key("users/u:1@x-y_z.safetensors")


# -- local ---------------------------------------------------------------------------------------


def test_local_writes_leave_no_temp_files_and_skip_them_in_listing(local_store):
    local_store.put_bytes("a/b.bin", b"x" * 1000)
    assert os.listdir(local_store.root / "a") == ["b.bin"]
    # What a writer killed mid-write leaves behind is not a key.
    (local_store.root / "a" / ".b.bin.123.chameleon-tmp").write_bytes(b"partial")
    assert local_store.list() == ["a/b.bin"]


def test_local_failed_write_keeps_the_old_file(local_store):
    local_store.put_bytes("a/b.bin", b"old")
    with pytest.raises(TypeError):
        local_store.put_bytes("a/b.bin", "not bytes")  # fails after the temp file was opened
    assert local_store.get_bytes("a/b.bin") == b"old"
    assert os.listdir(local_store.root / "a") == ["b.bin"]


def test_open_store_by_uri(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    local = open_store(tmp_path.as_uri() + "/sub")
    assert isinstance(local, LocalStore) and local.root == tmp_path / "sub"
    s3 = open_store("s3://my-bucket/some/prefix/", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.uri) == ("my-bucket", "some/prefix", "s3://my-bucket/some/prefix")
    assert open_store("s3://my-bucket").uri == "s3://my-bucket"
    with pytest.raises(ValueError, match="no bucket"):
        open_store("s3:///prefix")
    with pytest.raises(ValueError, match="unsupported storage URI scheme"):
        open_store("gs://bucket/x")
    with pytest.raises(ValueError, match="bucket name"):
        open_store("s3://Bad_Bucket/x")
    with pytest.raises(ValueError, match="'..' segment"):
        open_store("s3://my-bucket/a/../b")


def test_endpoint_from_environment(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("CHAMELEON_S3_ENDPOINT", "http://127.0.0.1:9")
    assert S3Store("my-bucket").endpoint_url == "http://127.0.0.1:9"
    monkeypatch.delenv("CHAMELEON_S3_ENDPOINT")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8")
    assert S3Store("my-bucket").endpoint_url == "http://127.0.0.1:8"
    assert S3Store("my-bucket", endpoint_url="http://127.0.0.1:7").endpoint_url == "http://127.0.0.1:7"


# -- S3 on SeaweedFS -----------------------------------------------------------------------------


def test_wrong_secret_key_is_rejected_clearly(s3_server, s3_store):
    s3_store.put_bytes("x", b"1")
    bad = S3Store(s3_store.bucket, s3_store.prefix, endpoint_url=s3_server.endpoint_url,
                  access_key=s3_server.access_key, secret_key="not-the-secret")  # fmt: skip
    with pytest.raises(StoreAccessError, match="check the credentials") as info:
        bad.get_bytes("x")
    assert s3_server.endpoint_url in str(info.value)
    assert s3_server.access_key in str(info.value)
    assert "not-the-secret" not in str(info.value)


def test_unknown_access_key_is_rejected(s3_server, s3_store):
    bad = S3Store(
        s3_store.bucket, endpoint_url=s3_server.endpoint_url, access_key="nobody", secret_key="x" * 40
    )
    with pytest.raises(StoreAccessError):
        bad.put_bytes("x", b"1")
    with pytest.raises(PermissionError):
        bad.list()


def test_missing_bucket(s3_server):
    opts = s3_server.storage_options()
    with pytest.raises(BucketNotFoundError, match="create_bucket=True"):
        S3Store("no-such-bucket-here", **opts).get_bytes("x")
    created = S3Store("created-on-demand", create_bucket=True, **opts)
    created.put_bytes("x", b"1")
    assert S3Store("created-on-demand", **opts).get_bytes("x") == b"1"


def test_unreachable_endpoint_is_a_clear_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = S3Store("my-bucket", endpoint_url=f"http://127.0.0.1:{port}", access_key="a", secret_key="b",
                    max_attempts=1, connect_timeout=1, retry_deadline_s=2)  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(
        StoreUnavailableError, match=rf"127.0.0.1:{port} kept failing for \d+ s on s3://my-bucket/x"
    ):
        store.exists("x")
    assert time.monotonic() - t0 >= 1  # retried with backoff until the deadline, then given up


def test_pickled_s3_store_works_and_carries_no_client(s3_store):
    s3_store.put_bytes("before.txt", b"1")  # the client exists now
    data = pickle.dumps(s3_store)
    copy = pickle.loads(data)
    assert copy._shared.client is None
    assert copy.get_bytes("before.txt") == b"1"
    copy.put_bytes("after.txt", b"2")
    assert s3_store.list() == ["after.txt", "before.txt"]
    assert s3_store.secret_key not in repr(s3_store)


def test_children_made_before_first_use_share_one_client(s3_store, monkeypatch):
    """A Ray task gets a pickled store (no client) and opens a child per file it writes: they must
    share one client, not build one each (about 0.2 s apiece: 40 staged partitions took 8 s)."""
    fresh = pickle.loads(pickle.dumps(s3_store))
    made = []
    make = type(fresh)._make_client
    monkeypatch.setattr(type(fresh), "_make_client", lambda self: made.append(1) or make(self))
    children = [fresh.child(f"part-{k}") for k in range(5)]
    for k, child in enumerate(children):
        child.put_bytes("x.txt", str(k).encode())
    assert [fresh.child(f"part-{k}").get_bytes("x.txt") for k in range(5)] == [b"0", b"1", b"2", b"3", b"4"]
    assert len(made) == 1


def test_large_object_goes_multipart(s3_store, monkeypatch):
    monkeypatch.setattr(storage, "_MULTIPART_THRESHOLD", 1 << 20)
    blob = os.urandom(3 << 20) * 6  # 18 MiB: above boto3's 8 MiB part size
    s3_store.put_bytes("big.bin", blob)
    assert s3_store.get_bytes("big.bin") == blob


# -- the local server itself ---------------------------------------------------------------------


def test_seaweedfs_listens_on_loopback_only(s3_server):
    assert s3_server.backend == "seaweedfs"
    proc = psutil.Process(s3_server._proc.pid)
    listening = [c.laddr for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening, "SeaweedFS listens on no port"
    assert {addr.ip for addr in listening} == {"127.0.0.1"}


@pytest.mark.job  # starts a moto server
def test_moto_backend_round_trip():
    with LocalS3Server(backend="moto") as server:
        assert server.endpoint_url.startswith("http://127.0.0.1:")
        store = server.store("moto-bucket", "p")
        store.put_parquet("t.parquet", _table())
        assert store.get_parquet("t.parquet").equals(_table())
    with pytest.raises(S3ServerError, match="not running"):
        server.endpoint_url  # noqa: B018


@pytest.mark.job  # starts a SeaweedFS
def test_server_stop_removes_its_data(tmp_path):
    server = LocalS3Server(backend="seaweedfs").start()
    data_dir, proc = server._tmp, server._proc
    server.store("stop-test").put_bytes("x", b"1")
    server.stop()
    assert proc.poll() is not None
    assert not data_dir.exists()


def test_server_that_dies_reports_its_log(tmp_path):
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'fatal: something is broken' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(S3ServerError, match="(?s)exited with code 3.*something is broken"):
        LocalS3Server(backend="seaweedfs", weed_path=str(fake)).start()
