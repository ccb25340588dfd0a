"""Run artifacts: manifest last, `latest` pointer, checksums, immutability, the model check."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pytest
import torch
from conftest import stub_manifest
from tiny_models import random_llama

from chameleon.core.fingerprint import ModelMismatchError, fingerprint_model
from chameleon.data.artifacts import (
    FORMAT_VERSION,
    ArtifactError,
    ChecksumMismatchError,
    RunConflictError,
    RunImmutableError,
    RunNotFoundError,
    RunReader,
    RunWriter,
    latest_run_id,
    new_run_id,
    validate_run_id,
)
from chameleon.data.manifest import ModelInfo
from chameleon.data.storage import LocalStore, StoreConflictError


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.job)])  # s3: the job tier
def store(request):
    return request.getfixturevalue(f"{request.param}_store")


def _write_all(writer: RunWriter) -> None:
    writer.put_safetensors(
        "groups/g1.safetensors",
        {"theta_p": torch.arange(12, dtype=torch.float32).reshape(3, 4), "layers": torch.tensor([3, 5])},
        metadata={"group_id": "g1", "rank": "3"},
    )
    writer.put_parquet("assignments.parquet", pa.table({"user_id": ["u1", "u2"], "group_id": ["g1", "g1"]}))
    writer.put_json("config.json", {"alpha": 1.0})
    writer.put_jsonl(
        "rejects.jsonl", [{"index": 3, "reason": "history is empty"}, {"index": 7, "reason": "ü"}]
    )
    writer.put_bytes("notes.txt", b"free text")


def test_round_trip(store):
    writer = RunWriter(store, "run-1")
    _write_all(writer)
    manifest = writer.commit(stub_manifest(model=ModelInfo(id="tiny", fingerprint={})))

    reader = RunReader(store)  # follows `latest`
    assert reader.run_id == "run-1"
    assert reader.manifest == manifest
    assert reader.manifest.model.id == "tiny" and reader.manifest.format_version == FORMAT_VERSION
    assert reader.manifest.created_at and reader.manifest.run_id == "run-1"
    assert reader.files == [
        "assignments.parquet",
        "config.json",
        "groups/g1.safetensors",
        "notes.txt",
        "rejects.jsonl",
    ]
    assert manifest.files["notes.txt"].model_dump() == {
        "sha256": hashlib.sha256(b"free text").hexdigest(),
        "bytes": 9,
        "key": f"attempts/{writer.attempt}/notes.txt",
    }

    tensors, meta = reader.get_safetensors("groups/g1.safetensors")
    assert torch.equal(tensors["theta_p"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert torch.equal(tensors["layers"], torch.tensor([3, 5]))
    assert meta == {"group_id": "g1", "rank": "3"}
    assert reader.get_parquet("assignments.parquet").column("group_id").to_pylist() == ["g1", "g1"]
    assert reader.get_json("config.json") == {"alpha": 1.0}
    assert reader.get_jsonl("rejects.jsonl")[1] == {"index": 7, "reason": "ü"}
    assert reader.get_bytes("notes.txt") == b"free text"


def test_manifest_is_written_last_then_latest(tmp_path):
    class RecordingStore(LocalStore):
        """A real local store that remembers the order of writes."""

        writes: list[str] = []

        def put_bytes(self, key, data, *, if_absent=False):
            super().put_bytes(key, data, if_absent=if_absent)
            RecordingStore.writes.append(self.key_uri(key).removeprefix(root.uri + "/"))

        def child(self, prefix):
            return RecordingStore(self.root / prefix)

    root = RecordingStore(tmp_path)
    writer = RunWriter(root, "r1")
    _write_all(writer)
    writer.commit(stub_manifest())
    assert RecordingStore.writes[-2:] == ["runs/r1/manifest.json", "latest"]
    assert len(RecordingStore.writes) == 7


def test_run_without_manifest_is_invisible(store):
    writer = RunWriter(store, "half")
    _write_all(writer)  # the job dies before commit()
    with pytest.raises(RunNotFoundError, match="no 'latest' pointer"):
        RunReader(store)
    with pytest.raises(RunNotFoundError, match="no manifest.json"):
        RunReader(store, "half")
    assert latest_run_id(store) is None
    # Even a `latest` pointing at it (say, written by hand) does not make it readable.
    store.put_text("latest", "half\n")
    with pytest.raises(RunNotFoundError, match="does not exist or is incomplete"):
        RunReader(store)
    assert isinstance(RunNotFoundError("x"), FileNotFoundError)


def test_latest_points_at_newest_committed_run(store):
    for run_id, alpha in [("r1", 1.0), ("r2", 2.0)]:
        writer = RunWriter(store, run_id)
        writer.put_json("config.json", {"alpha": alpha})
        writer.commit(stub_manifest())
    staging = RunWriter(store, "r3-staging")
    staging.put_json("config.json", {"alpha": 3.0})
    staging.commit(stub_manifest(), set_latest=False)
    RunWriter(store, "r4-unfinished").put_json("config.json", {})

    assert latest_run_id(store) == "r2"
    assert RunReader(store).get_json("config.json") == {"alpha": 2.0}
    assert RunReader(store, "r1").get_json("config.json") == {"alpha": 1.0}  # older runs stay readable
    assert RunReader(store, "r3-staging").get_json("config.json") == {"alpha": 3.0}  # committed, not latest
    with pytest.raises(RunNotFoundError):
        RunReader(store, "r4-unfinished")


def test_tampered_file_fails_checksum(store):
    writer = RunWriter(store, "r1")
    _write_all(writer)
    manifest = writer.commit(stub_manifest())
    group_file = "runs/r1/" + manifest.files["groups/g1.safetensors"].key
    store.put_bytes(group_file, store.get_bytes(group_file)[:-4] + b"\0\0\0\0")
    reader = RunReader(store)
    with pytest.raises(ChecksumMismatchError) as info:
        reader.get_safetensors("groups/g1.safetensors")
    message = str(info.value)
    assert "groups/g1.safetensors" in message
    assert manifest.files["groups/g1.safetensors"].sha256 in message
    store.put_bytes("runs/r1/" + manifest.files["config.json"].key, b"{}")  # truncated / replaced
    with pytest.raises(ChecksumMismatchError, match="config.json"):
        reader.get_json("config.json")
    assert reader.get_parquet("assignments.parquet").num_rows == 2  # untouched files still read


def test_files_not_in_manifest_are_refused(store):
    writer = RunWriter(store, "r1")
    writer.put_json("config.json", {})
    writer.commit(stub_manifest())
    store.put_bytes("runs/r1/extra.json", b"{}")
    with pytest.raises(ArtifactError, match="not listed in the manifest"):
        RunReader(store).get_json("extra.json")
    with pytest.raises(ArtifactError, match="not listed"):
        RunReader(store).get_json("../../latest")


def test_committed_run_is_immutable(store):
    writer = RunWriter(store, "r1")
    writer.put_json("config.json", {})
    writer.commit(stub_manifest())
    with pytest.raises(RunImmutableError, match="already committed"):
        writer.put_json("config.json", {"changed": True})
    with pytest.raises(RunImmutableError):
        writer.commit(stub_manifest())
    with pytest.raises(RunImmutableError, match="write a new run id"):
        RunWriter(store, "r1")
    assert RunReader(store, "r1").get_json("config.json") == {}


def test_resume_adopts_files_of_an_earlier_attempt_only_with_their_hashes(store):
    first = RunWriter(store, "r1")
    first.put_parquet("pairs/part-00000.parquet", pa.table({"x": [1, 2]}))
    entry = first.files["pairs/part-00000.parquet"]
    assert entry["key"].startswith(f"attempts/{first.attempt}/")  # every writer has its own folder
    # ...the job restarts; a new writer picks the run up.
    second = RunWriter(store, "r1")
    assert second.attempt != first.attempt
    assert not second.adopt("pairs/part-00000.parquet", {**entry, "sha256": "0" * 64})  # other bytes
    assert not second.adopt("pairs/part-00000.parquet", {**entry, "key": "attempts/x/missing.parquet"})
    assert second.adopt("pairs/part-00000.parquet", entry)
    assert second.files["pairs/part-00000.parquet"] == entry
    second.put_parquet("pairs/part-00001.parquet", pa.table({"x": [3]}))
    second.commit(stub_manifest())
    reader = RunReader(store)
    assert reader.files == ["pairs/part-00000.parquet", "pairs/part-00001.parquet"]
    assert reader.get_parquet("pairs/part-00000.parquet").column("x").to_pylist() == [1, 2]


def test_two_writers_on_one_run_id_never_both_commit_nor_overwrite_the_committed_files(store):
    a, b = RunWriter(store, "r1"), RunWriter(store, "r1")  # both opened before either commits
    a.put_json("config.json", {"by": "a"})
    b.put_json("config.json", {"by": "b"})
    committed = b.commit(stub_manifest(prompt_version="b"))
    a.put_json("late.json", {"by": "a"})  # still writes, but only into its own attempt folder
    with pytest.raises(RunConflictError, match="committed by another writer"):
        a.commit(stub_manifest(prompt_version="a"))
    reader = RunReader(store, "latest")
    assert reader.manifest == committed and reader.run_id == "r1"
    for rel in reader.files:  # every committed file still has the bytes it was committed with
        reader.get_bytes(rel)
    assert reader.get_json("config.json") == {"by": "b"}


def test_exclusive_create(store):
    store.put_bytes("x/once", b"first", if_absent=True)
    with pytest.raises(StoreConflictError, match="already exists"):
        store.put_bytes("x/once", b"second", if_absent=True)
    store.put_bytes("x/once", b"first", if_absent=True)  # a retry of the same create is no conflict
    assert store.get_bytes("x/once") == b"first"
    assert store.list("x/") == ["x/once"]  # no temporary file left behind


@pytest.mark.parametrize("bad", ["", ".hidden", "../x", "a/b", "a b", "x" * 129, "latest\n", "é"])
def test_invalid_run_ids(local_store, bad):
    with pytest.raises(ValueError, match="invalid run id"):
        RunWriter(local_store, bad)
    with pytest.raises(ValueError, match="invalid run id"):
        RunReader(local_store, bad)


def test_valid_run_ids():
    assert validate_run_id("2026-11-27_run.v1") == "2026-11-27_run.v1"
    assert validate_run_id("x" * 128)
    run_id = new_run_id("lamp7")
    assert run_id.startswith("lamp7-") and validate_run_id(run_id)


def test_invalid_artifact_paths_and_fields(local_store):
    writer = RunWriter(local_store, "r1")
    with pytest.raises(ValueError):
        writer.put_bytes("../../latest", b"r0")
    with pytest.raises(ValueError, match="written by commit"):
        writer.put_json("manifest.json", {})
    with pytest.raises(ValueError, match="set by commit"):
        writer.commit(stub_manifest(files={"a": {"sha256": "0", "bytes": 0}}))
    with pytest.raises(ValueError, match="not this run's id"):
        writer.commit(stub_manifest(run_id="r2"))
    with pytest.raises(TypeError, match="str to str"):
        writer.put_safetensors("a.safetensors", {"t": torch.zeros(2)}, metadata={"rank": 3})
    assert latest_run_id(local_store) is None


def test_safetensors_bytes_are_deterministic_with_metadata():
    # Checksums in manifests compare reruns: the same tensors and metadata must give the same bytes.
    from chameleon.data.artifacts import read_safetensors_bytes, safetensors_bytes

    tensors = {"b": torch.ones(2), "a": torch.zeros(3, 4), "i": torch.arange(5)}
    meta = {f"k{i}": str(i) for i in range(12)}
    blobs = {safetensors_bytes(tensors, meta) for _ in range(10)}
    assert len(blobs) == 1
    back, back_meta = read_safetensors_bytes(blobs.pop())
    assert back_meta == meta and torch.equal(back["a"], tensors["a"]) and torch.equal(back["i"], tensors["i"])


def test_reader_refuses_a_run_made_for_another_model(store):
    made_with = fingerprint_model(random_llama(0), "tiny-seed-0")
    other = fingerprint_model(random_llama(1), "tiny-seed-1")
    writer = RunWriter(store, "r1")
    writer.put_json("config.json", {})
    writer.commit(stub_manifest(model=ModelInfo(id="tiny-seed-0", fingerprint=made_with.to_dict())))
    reader = RunReader(store)
    reader.check_model(made_with)
    with pytest.raises(ModelMismatchError, match="run 'r1'"):
        reader.check_model(other)
    RunWriter(store, "r3").commit(stub_manifest())
    with pytest.raises(ArtifactError, match="records no model fingerprint"):
        RunReader(store, "r3").check_model(made_with)


def test_writer_reads_back_only_what_it_recorded_unchanged(store):
    writer = RunWriter(store, "r1")
    writer.put_json("a.json", {"x": 1})
    assert writer.get_json("a.json") == {"x": 1}
    with pytest.raises(ArtifactError, match="not listed in the files recorded"):
        writer.get_json("b.json")
    writer.run_store.put_bytes(writer.files["a.json"]["key"], b'{"x": 2}')  # changed behind its back
    with pytest.raises(ChecksumMismatchError):
        writer.get_json("a.json")
