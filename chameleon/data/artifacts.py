"""One run's immutable artifacts: checksummed files, a manifest written last, a `latest` pointer.

Layout below a store's root (the files of a run: `chameleon.data.layout`):

    runs/<run_id>/attempts/<attempt>/<relpath>   the files one writer wrote (safetensors, parquet, ...)
    runs/<run_id>/manifest.json    written LAST: {files: {relpath: {sha256, bytes, key}}, ...fields}
    latest                         text: the run id of the newest committed run

A run without a manifest is invisible to readers (it is incomplete or was abandoned), and a run
with one is immutable. Readers verify every file against the manifest's sha256, so a truncated
or tampered file fails loudly instead of loading wrong edits.

One writer per run: every `RunWriter` writes under its own attempt folder, so no two writers (two
jobs on one run id, a zombie actor, a late retry) ever write the same object, and the manifest
maps each file's logical path (`assignments.parquet`) to the object holding it. The manifest is
created exclusively (`If-None-Match: *`): of two writers racing to commit, one wins and the other
gets `RunConflictError`; nothing the committed manifest lists can be overwritten afterwards.

The manifest is a typed `RunManifest` (`chameleon.data.manifest`: its fields, its format versions).
It records the model's fingerprint (`chameleon.core.fingerprint`); `RunReader.check_model` refuses
edits computed on another model (directions of one model mean nothing in another).
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from chameleon.core.fingerprint import ModelFingerprint, check_compatible
from chameleon.data.ids import validate_id
from chameleon.data.manifest import (
    FORMAT_VERSION,
    READABLE_VERSIONS,
    FileEntry,
    ManifestError,
    RunManifest,
)
from chameleon.data.storage import (
    Store,
    StoreConflictError,
    StoreKeyError,
    parquet_bytes,
    read_parquet_bytes,
    validate_key,
)

__all__ = [  # the format versions live with the manifest; re-exported for the artifact's readers
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "ArtifactError",
    "ChecksumMismatchError",
    "RunConflictError",
    "RunImmutableError",
    "RunNotFoundError",
    "RunReader",
    "RunWriter",
    "committed_manifest",
    "latest_run_id",
    "new_attempt_id",
    "new_run_id",
    "point_latest",
    "read_safetensors_bytes",
    "safetensors_bytes",
    "validate_run_id",
]

MANIFEST = "manifest.json"
LATEST = "latest"
RUNS = "runs"
ATTEMPTS = "attempts"


class ArtifactError(Exception):
    """Base class of artifact errors."""


class RunNotFoundError(ArtifactError, FileNotFoundError):
    """No committed run (no `latest` pointer, or no manifest for the run id)."""


class RunImmutableError(ArtifactError):
    """The run already has a manifest: it cannot be written to again."""


class RunConflictError(RunImmutableError):
    """Another writer committed the run first; this writer's files are left unused."""


class ChecksumMismatchError(ArtifactError):
    """A file's content does not match the hash recorded in the manifest."""


def validate_run_id(run_id: str) -> str:
    """Run ids become key segments: the one id grammar of `chameleon.data.ids`."""
    return validate_id(run_id, "run id")


def new_run_id(prefix: str = "") -> str:
    """A fresh, sortable run id: `[prefix-]YYYYMMDDTHHMMSSZ-<6 hex>`."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return validate_run_id(f"{prefix + '-' if prefix else ''}{stamp}-{uuid.uuid4().hex[:6]}")


def new_attempt_id() -> str:
    """A writer's own folder name: sortable by start time, unique across machines."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:10]}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _jsonl_bytes(rows: Iterable[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def _run_prefix(run_id: str) -> str:
    return f"{RUNS}/{validate_run_id(run_id)}"


# -- safetensors (bytes API) ---------------------------------------------------------------------


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize tensors (moved to CPU, made contiguous) with string metadata."""
    from safetensors.torch import save

    if metadata is not None:
        bad = {
            k: type(v).__name__
            for k, v in metadata.items()
            if not isinstance(k, str) or not isinstance(v, str)
        }
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; offending entries: {bad}")
    # Views of one storage cannot be saved as separate tensors: give each its own memory.
    cpu = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    raw = save(cpu)
    if not metadata:
        return raw
    # safetensors writes metadata through a hash map, so its key order (and the file's hash) varies
    # between calls. Rebuild the header with sorted keys: same tensors, same bytes, same checksum.
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    header["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(text)) + text + raw[8 + header_len :]


def read_safetensors_bytes(data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """`(tensors, metadata)` from safetensors bytes."""
    from safetensors.torch import load

    # The bytes API returns tensors only; the metadata sits in the JSON header (u64 LE length first).
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    return load(data), dict(header.get("__metadata__") or {})


# -- writing -------------------------------------------------------------------------------------


class VerifiedFiles:
    """Reads of a run's files, each checked against the sha256 recorded for it.

    `RunReader` checks against the committed manifest; `RunWriter` against what it wrote or adopted
    (so the job's reduce reads its own partitions through the same check as every later reader).
    """

    run_id: str
    run_store: Store
    _record_name = "record"
    """What the hashes come from, for messages: the manifest, or what a writer recorded."""

    def _entry(self, relpath: str) -> FileEntry | None:
        raise NotImplementedError

    def get_bytes(self, relpath: str) -> bytes:
        """The file's bytes after checking them against the recorded hash."""
        entry = self._entry(relpath)
        if entry is None:
            raise ArtifactError(
                f"{relpath!r} is not listed in the {self._record_name} of run {self.run_id!r} at "
                f"{self.run_store.uri}; only recorded files can be read"
            )
        validate_key(relpath, what="artifact path")
        data = self.run_store.get_bytes(validate_key(entry.object_key(relpath), what="artifact key"))
        actual = _sha256(data)
        if actual != entry.sha256:
            raise ChecksumMismatchError(
                f"{self.run_store.key_uri(relpath)} does not match the {self._record_name} of run {self.run_id!r}: "
                f"expected sha256 {entry.sha256} ({entry.bytes} bytes), got {actual} ({len(data)} bytes)"
            )
        return data

    def get_safetensors(self, relpath: str) -> tuple[dict[str, Any], dict[str, str]]:
        """`(tensors on CPU, metadata)`."""
        return read_safetensors_bytes(self.get_bytes(relpath))

    def get_parquet(self, relpath: str) -> pa.Table:
        return read_parquet_bytes(self.get_bytes(relpath))

    def get_json(self, relpath: str) -> Any:
        return json.loads(self.get_bytes(relpath))

    def get_jsonl(self, relpath: str) -> list[Any]:
        return [
            json.loads(line) for line in self.get_bytes(relpath).decode("utf-8").splitlines() if line.strip()
        ]


class RunWriter(VerifiedFiles):
    """Writes the files of one run into its own attempt folder, records their sha256, size and
    object key, and commits the manifest.

    Writing into a run that already has a manifest raises `RunImmutableError`. A run without one
    can be reopened (to resume a job): files of earlier attempts can be kept with `adopt`, which
    checks them against the hashes they were recorded with.
    """

    _record_name = "files recorded by this writer"

    def __init__(self, store: Store, run_id: str, *, attempt: str | None = None) -> None:
        self.store = store
        self.run_id = validate_run_id(run_id)
        self.run_store = store.child(_run_prefix(run_id))
        self.attempt = validate_id(attempt or new_attempt_id(), "attempt id")
        self._files: dict[str, FileEntry] = {}
        self._lock = threading.Lock()
        self._committed = False
        self._check_open()

    @property
    def uri(self) -> str:
        return self.run_store.uri

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """What was recorded so far, sorted: {relpath: {sha256, bytes, key}}."""
        with self._lock:
            return {k: v.model_dump() for k, v in sorted(self._files.items())}

    def _check_open(self) -> None:
        if self._committed or self.run_store.exists(MANIFEST):
            raise RunImmutableError(
                f"run {self.run_id!r} at {self.uri} is already committed (it has a {MANIFEST}); "
                "committed runs are immutable: write a new run id"
            )

    def _relpath(self, relpath: str) -> str:
        validate_key(relpath, what="artifact path")
        if relpath == MANIFEST:
            raise ValueError(f"{MANIFEST!r} is written by commit(), not as an artifact")
        return relpath

    def _record(self, relpath: str, entry: FileEntry) -> dict[str, Any]:
        with self._lock:
            self._files[relpath] = entry
        return entry.model_dump()

    def put_bytes(self, relpath: str, data: bytes) -> dict[str, Any]:
        """Write raw bytes into this writer's attempt folder; returns the recorded
        {sha256, bytes, key}."""
        relpath = self._relpath(relpath)
        if self._committed:
            self._check_open()
        key = f"{ATTEMPTS}/{self.attempt}/{relpath}"
        self.run_store.put_bytes(key, data)
        return self._record(relpath, FileEntry(sha256=_sha256(data), bytes=len(data), key=key))

    def put_safetensors(
        self, relpath: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        return self.put_bytes(relpath, safetensors_bytes(tensors, metadata))

    def put_parquet(self, relpath: str, table: pa.Table) -> dict[str, Any]:
        return self.put_bytes(relpath, parquet_bytes(table))

    def put_json(self, relpath: str, obj: Any) -> dict[str, Any]:
        return self.put_bytes(relpath, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))

    def put_jsonl(self, relpath: str, rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        return self.put_bytes(relpath, _jsonl_bytes(rows))

    def adopt(self, relpath: str, entry: Mapping[str, Any]) -> bool:
        """Keep a file another writer recorded as `entry` ({sha256, bytes, key}): True, and
        recorded, when its object is there with exactly those bytes; False otherwise."""
        relpath = self._relpath(relpath)
        try:
            key = validate_key(str(entry["key"]), what="artifact key")
            data = self.run_store.get_bytes(key)
        except (KeyError, ValueError, StoreKeyError):
            return False
        if _sha256(data) != entry.get("sha256") or len(data) != entry.get("bytes"):
            return False
        self._record(relpath, FileEntry(sha256=entry["sha256"], bytes=len(data), key=key))
        return True

    def record_written(self, relpath: str, entry: Mapping[str, Any]) -> None:
        """Record a file that a worker of this job just wrote with its own writer, as that writer
        recorded it ({sha256, bytes, key}), without reading it back (every read verifies it)."""
        key = validate_key(str(entry["key"]), what="artifact key")
        self._record(
            self._relpath(relpath), FileEntry(sha256=entry["sha256"], bytes=int(entry["bytes"]), key=key)
        )

    def _entry(self, relpath: str) -> FileEntry | None:
        with self._lock:
            return self._files.get(relpath)

    def commit(self, manifest: RunManifest, *, set_latest: bool = True) -> RunManifest:
        """Write `manifest.json` after every file, then point `latest` at this run. Returns the
        committed manifest: the given one stamped with `run_id`, `format_version`, `created_at`
        and `files` (what this writer recorded).

        `run_id` may be set when it equals this run's id; `files` must be left empty."""
        if manifest.run_id not in ("", self.run_id):
            raise ValueError(f"manifest run_id {manifest.run_id!r} is not this run's id {self.run_id!r}")
        if manifest.files:
            raise ValueError("manifest files are set by commit() itself, from what this writer recorded")
        if self._committed:
            self._check_open()
        stamp = {
            "run_id": self.run_id,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": self.files,
        }
        # Validated as a whole, as any reader will, before anything is published.
        full = RunManifest.model_validate({**manifest.to_dict(), **stamp})
        data = full.to_json().encode("utf-8")
        try:
            self.run_store.put_bytes(MANIFEST, data, if_absent=True)
        except StoreConflictError:
            raise RunConflictError(
                f"run {self.run_id!r} at {self.uri} was committed by another writer while this one "
                f"(attempt {self.attempt}) was running; the committed run stands and this attempt's "
                "files are unused: do not run two jobs on one run id"
            ) from None
        self._committed = True
        if set_latest:
            point_latest(self.store, self.run_id)
        return full


# -- reading -------------------------------------------------------------------------------------


class RunReader(VerifiedFiles):
    """Reads one committed run, verifying every file against its manifest.

    `run_id="latest"` follows the `latest` pointer. A run without a manifest raises
    `RunNotFoundError`: readers never see a half-written run.
    """

    _record_name = "manifest"

    def __init__(self, store: Store, run_id: str = LATEST) -> None:
        self.store = store
        if run_id == LATEST:
            run_id = latest_run_id(store) or ""
            if not run_id:
                raise RunNotFoundError(f"no committed run under {store.uri} (no {LATEST!r} pointer)")
        self.run_id = validate_run_id(run_id)
        self.run_store = store.child(_run_prefix(self.run_id))
        try:
            raw = self.run_store.get_bytes(MANIFEST)
        except StoreKeyError:
            raise RunNotFoundError(
                f"run {self.run_id!r} has no {MANIFEST} at {self.run_store.uri}: it does not exist or is incomplete"
            ) from None
        try:
            manifest = RunManifest.from_json(raw, run_id=self.run_id)
        except ManifestError as exc:
            raise ArtifactError(f"{exc} ({self.run_store.key_uri(MANIFEST)})") from None
        if manifest.run_id != self.run_id:
            raise ArtifactError(
                f"{self.run_store.key_uri(MANIFEST)} names run {manifest.run_id!r}, not {self.run_id!r}"
            )
        self._manifest = manifest

    @property
    def uri(self) -> str:
        return self.run_store.uri

    @property
    def manifest(self) -> RunManifest:
        return self._manifest

    @property
    def files(self) -> list[str]:
        """Relative paths of the run's files, sorted."""
        return sorted(self._manifest.files)

    def _entry(self, relpath: str) -> FileEntry | None:
        return self._manifest.files.get(relpath)

    def check_model(self, fingerprint: ModelFingerprint) -> None:
        """Refuse (`ModelMismatchError`) when this run was made for another model."""
        try:
            recorded = self._manifest.fingerprint
        except (TypeError, ValueError) as exc:
            raise ArtifactError(
                f"run {self.run_id!r} records no model fingerprint ({exc}): cannot check it "
                f"matches {fingerprint.model_id!r}"
            ) from None
        check_compatible(recorded, fingerprint, run_id=self.run_id)


def point_latest(store: Store, run_id: str) -> None:
    """Point `latest` at a committed run (a plain overwrite: the last commit wins)."""
    store.put_text(LATEST, validate_run_id(run_id) + "\n")


def committed_manifest(store: Store, run_id: str) -> RunManifest | None:
    """The manifest of `run_id` when it is committed, else None."""
    try:
        return RunReader(store, run_id).manifest
    except RunNotFoundError:
        return None


def latest_run_id(store: Store) -> str | None:
    """The run id in `latest`, or None when nothing was committed yet."""
    try:
        text = store.get_text(LATEST).strip()
    except StoreKeyError:
        return None
    return validate_run_id(text) if text else None
