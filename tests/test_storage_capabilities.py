"""The storage capability probe, multipart checksums, and what 409 and 501 mean, against real
loopback servers: SeaweedFS (enforces everything), moto (accepts wrong checksums), and moto behind
a real loopback proxy that drops `If-None-Match` (a store that ignores conditional writes)."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
from conftest import stub_manifest

from chameleon.data import s3_protocol, storage
from chameleon.data.artifacts import RunConflictError, RunWriter
from chameleon.data.capabilities import StoreCapabilityError, check_store, probe_store
from chameleon.data.storage import S3Store, StoreConflictError, StoreUnsupportedError
from chameleon.dev.s3proxy import S3Proxy
from chameleon.dev.s3server import LocalS3Server


@pytest.fixture(scope="module")
def moto_server():
    with LocalS3Server(backend="moto") as server:
        yield server


def _store_via(server: LocalS3Server, proxy: S3Proxy, **options) -> S3Store:
    opts = {**server.storage_options(), "endpoint_url": proxy.url, **options}
    return S3Store("caps-test", f"p-{uuid.uuid4().hex[:8]}", create_bucket=True, **opts)


@pytest.fixture
def ignoring_store(moto_server):
    """A store whose server never sees `If-None-Match`."""
    with S3Proxy(moto_server.endpoint_url, drop={"if-none-match"}) as proxy:
        yield _store_via(moto_server, proxy)


def test_seaweedfs_enforces_every_capability_and_the_probe_leaves_nothing(s3_store):
    caps = check_store(s3_store)
    assert (caps.conditional_create, caps.checksums, caps.multipart_checksums) == (
        "enforced",
        "verified",
        "verified",
    )
    assert s3_store.list() == []  # probe objects deleted
    uploads = s3_store.client.list_multipart_uploads(Bucket=s3_store.bucket, Prefix=s3_store.prefix)
    assert uploads.get("Uploads", []) == []  # the probe's multipart upload was aborted


def test_moto_accepts_wrong_checksums_and_the_probe_says_so(moto_server):
    caps = probe_store(moto_server.store("caps-test", "plain"))
    assert (caps.conditional_create, caps.checksums, caps.multipart_checksums) == (
        "enforced",
        "ignored",
        "ignored",
    )


def test_a_store_that_ignores_if_none_match_is_refused_to_writers(ignoring_store):
    # The defect the probe exists for: the second exclusive create silently replaces the first.
    ignoring_store.put_bytes("m", b"first", if_absent=True)
    ignoring_store.put_bytes("m", b"second", if_absent=True)
    assert ignoring_store.get_bytes("m") == b"second"
    with pytest.raises(StoreCapabilityError, match=r"ignores conditional writes.*single_writer"):
        check_store(ignoring_store)
    # A server only reads: it reports, never refuses.
    assert check_store(ignoring_store, role="server").conditional_create == "ignored"


def test_single_writer_mode_emulates_exclusive_create(ignoring_store):
    caps = check_store(ignoring_store, single_writer=True)
    assert caps.conditional_create == "ignored" and ignoring_store.exclusive_create == "emulated"
    ignoring_store.put_bytes("m", b"first", if_absent=True)
    with pytest.raises(StoreConflictError):
        ignoring_store.put_bytes("m", b"second", if_absent=True)
    ignoring_store.put_bytes("m", b"first", if_absent=True)  # a retried create: no conflict
    assert ignoring_store.get_bytes("m") == b"first"
    # Two writers one after the other on one run id: the later commit is refused.
    a, b = RunWriter(ignoring_store, "r1"), RunWriter(ignoring_store, "r1")
    a.put_json("x.json", {"w": "a"})
    b.put_json("x.json", {"w": "b"})
    a.commit(stub_manifest())
    with pytest.raises(RunConflictError):
        b.commit(stub_manifest())


def test_every_multipart_part_carries_its_checksum(moto_server, monkeypatch):
    monkeypatch.setattr(storage, "_MULTIPART_THRESHOLD", 6 << 20)
    monkeypatch.setattr(s3_protocol, "PART_SIZE", 5 << 20)
    blob = os.urandom(11 << 20)  # 3 parts
    with S3Proxy(moto_server.endpoint_url) as proxy:
        store = _store_via(moto_server, proxy)
        store.put_bytes("big.bin", blob)
        assert store.get_bytes("big.bin") == blob
        parts = proxy.upload_parts()
    assert len(parts) == 3
    assert [p for p in parts if "x-amz-checksum-sha256" not in p.headers] == []


def test_multipart_on_seaweedfs_round_trips_with_checksums(s3_store, monkeypatch):
    monkeypatch.setattr(storage, "_MULTIPART_THRESHOLD", 6 << 20)
    monkeypatch.setattr(s3_protocol, "PART_SIZE", 5 << 20)
    blob = os.urandom(11 << 20)
    s3_store.put_bytes("big.bin", blob)
    assert s3_store.get_bytes("big.bin") == blob
    head = s3_store.client.head_object(
        Bucket=s3_store.bucket, Key=s3_store.s3_key("big.bin"), ChecksumMode="ENABLED"
    )
    assert head.get("ChecksumSHA256", "").endswith("-3")  # a SHA-256 upload of 3 checksummed parts


def test_409_is_retried(moto_server):
    with S3Proxy(moto_server.endpoint_url) as proxy:
        store = _store_via(moto_server, proxy, retry_deadline_s=20)
        store.list()  # bucket checked (and made) before the injected error, whatever ran first
        proxy.fail_next("PUT", 409, "ConditionalRequestConflict")
        store.put_bytes("m", b"first", if_absent=True)
        assert store.get_bytes("m") == b"first"
        puts = [r.status for r in proxy.requests if r.method == "PUT" and r.path.endswith("/m")]
        assert puts == [409, 200]


def test_501_is_unsupported_not_an_outage(moto_server):
    with S3Proxy(moto_server.endpoint_url) as proxy:
        store = _store_via(moto_server, proxy, retry_deadline_s=20)
        store.list()  # bucket checked (and made) before the injected error, whatever ran first
        proxy.fail_next("PUT", 501, "NotImplemented", times=50)
        t0 = time.monotonic()
        with pytest.raises(StoreUnsupportedError, match="does not implement"):
            store.put_bytes("m", b"x")
        assert time.monotonic() - t0 < 5  # not retried for the 20 s deadline
        assert [r.status for r in proxy.requests if r.method == "PUT" and r.path.endswith("/m")] == [501]


def test_the_job_probes_at_start_and_honours_single_writer(ignoring_store, tiny_model_dir, tmp_path):
    from conftest import tiny_job_config

    from chameleon.dev.demo import example_users
    from chameleon.job.run import begin_run
    from chameleon.job.spec import model_identity

    path = tmp_path / "users.jsonl"
    path.write_text("".join(json.dumps(u) + "\n" for u in example_users(1)[:4]))
    cfg = tiny_job_config(tiny_model_dir)
    with pytest.raises(StoreCapabilityError, match="single_writer"):
        begin_run(str(path), ignoring_store, "r1", cfg, model_identity(cfg))
    assert ignoring_store.list("runs/") == []  # refused before anything was written
    cfg = cfg.with_overrides({"storage.single_writer": True})
    plan = begin_run(str(path), ignoring_store, "r1", cfg, model_identity(cfg))
    assert plan.todo and ignoring_store.exclusive_create == "emulated"


def test_single_writer_flag_sets_the_config_key():
    from chameleon.cli import build_parser
    from chameleon.flags import load_config

    parser = build_parser()
    args = parser.parse_args(["personalize", "--input", "u.jsonl", "--single-writer"])
    assert load_config(args).storage.single_writer is True
    args = parser.parse_args(["personalize", "--input", "u.jsonl"])
    assert load_config(args).storage.single_writer is False
