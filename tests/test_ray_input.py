"""Inputs at scale: a directory or glob of JSONL / Parquet / LaMP JSON files, local or `s3://`,
read and validated by Ray Data tasks (never on the driver), hash-partitioned by user id, with
duplicates across files caught and rejects written per file with their reasons."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TEST_BUCKET

from chameleon.config import ChameleonConfig
from chameleon.data.artifacts import RunWriter
from chameleon.data.inputs import expand_input, prepare_input
from chameleon.job.ray_input import DUPLICATES, read_staged, rejects_key, stage_input
from chameleon.job.staging import hash_partition


def _user(i: int, **extra) -> dict:
    return {"user_id": f"u{i:03d}", "history": [{"text": f"tweet {i} {j}"} for j in range(3)], **extra}


def _write_inputs(root) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.jsonl").write_text("".join(json.dumps(_user(i)) + "\n" for i in range(0, 10)) + "{not json\n")
    pq.write_table(pa.Table.from_pylist([_user(i) for i in range(10, 20)] + [_user(3)]), root / "b.parquet")
    lamp = [{"id": 500 + i, "input": "q", "profile": [{"text": f"t {i}"}]} for i in range(5)]
    (root / "c.json").write_text(json.dumps(lamp + [{"id": 7}]))
    (root / "notes.txt").write_text("not an input")


def test_expand_input_takes_a_file_a_directory_or_a_glob_local_or_s3(tmp_path, s3_server):
    _write_inputs(tmp_path / "in")
    names = lambda files: [f.rsplit("/", 1)[1] for f in files]  # noqa: E731
    assert names(expand_input(str(tmp_path / "in"))) == ["a.jsonl", "b.parquet", "c.json"]
    assert names(expand_input(str(tmp_path / "in" / "*.j*"))) == ["a.jsonl", "c.json"]
    assert expand_input(str(tmp_path / "in" / "a.jsonl")) == [str(tmp_path / "in" / "a.jsonl")]
    store = s3_server.store(TEST_BUCKET, "expand")
    for f in (tmp_path / "in").iterdir():
        store.put_bytes(f"in/{f.name}", f.read_bytes())
    uri = store.key_uri("in")
    opts = s3_server.storage_options()
    assert names(expand_input(uri + "/", **opts)) == ["a.jsonl", "b.parquet", "c.json"]
    assert names(expand_input(uri + "/*.parquet", **opts)) == ["b.parquet"]
    with pytest.raises(FileNotFoundError, match="no users files"):
        expand_input(str(tmp_path / "in" / "*.csv"))
    # The in-process driver reads the same set of files.
    prepared = prepare_input(str(tmp_path / "in"), ChameleonConfig())
    assert len(prepared.users) == 24 and prepared.n_input == 28


def test_staging_reads_on_ray_rejects_per_file_and_partitions_by_hash(ray_local, tmp_path, s3_server):
    _write_inputs(tmp_path / "in")
    store = s3_server.store(TEST_BUCKET, "staged")
    for f in (tmp_path / "in").iterdir():
        store.put_bytes(f"in/{f.name}", f.read_bytes())
    cfg = ChameleonConfig().with_overrides({"job.users_per_partition": 4})
    writer = RunWriter(store, "r")
    staged = stage_input(store.key_uri("in") + "/", writer, cfg, **s3_server.storage_options())
    # 10 + 1 bad line, 11 rows (u003 again), 5 LaMP + 1 without profile
    assert staged.records == 28 and staged.rejected == 4
    ids = sorted(u for p in staged.partition_ids for u in p)
    assert "u003" not in ids and len(ids) == 24 and "500" in ids  # both copies of u003 rejected
    n = len(staged.partition_ids)
    assert n == 6  # ceil(24 / 4)
    for k, part in enumerate(staged.partition_ids):
        assert part == sorted(part) and all(hash_partition(u, n) == k for u in part)
        assert [u.user_id for u in read_staged(writer.run_store, staged.inputs[k])] == part
    reasons = [r["reason"] for r in writer.get_jsonl(rejects_key(0))]
    assert len(reasons) == 1 and "unreadable" in reasons[0]
    assert [r["reason"] for r in writer.get_jsonl(rejects_key(2))] == ["missing user_id"]
    dups = writer.get_jsonl(DUPLICATES)
    assert {r["user_id"] for r in dups} == {"u003"} and len(dups) == 2
    assert all("duplicate user_id (2 records)" in r["reason"] for r in dups)
    assert {r["file"].rsplit("/", 1)[1] for r in dups} == {"a.jsonl", "b.parquet"}
