"""One run's immutable artifacts: checksummed files, a manifest written last, a `latest` pointer.

Layout below a store's root (DESIGN.md section 3):

    runs/<run_id>/...              the files of one run (safetensors, parquet, json, jsonl)
    runs/<run_id>/manifest.json    written LAST: {files: {relpath: {sha256, bytes}}, ...fields}
    latest                         text: the run id of the newest committed run

A run without a manifest is invisible to readers (it is incomplete or was abandoned), and a run
with one is immutable. Readers verify every file against the manifest's sha256, so a truncated
or tampered file fails loudly instead of loading wrong edits.

`fingerprint_model` identifies the model an artifact was made for; `check_compatible` refuses
to serve edits computed on another model (directions of one model mean nothing in another).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from chameleon.storage import Store, StoreKeyError, parquet_bytes, read_parquet_bytes, validate_key

FORMAT_VERSION = 1
"""Bumped when the layout or the manifest changes incompatibly."""

MANIFEST = "manifest.json"
LATEST = "latest"
RUNS = "runs"
FINGERPRINT_KEY = "model_fingerprint"
"""Manifest field holding `ModelFingerprint.to_dict()`; `manifest["model"]["fingerprint"]` is
accepted too (see `RunReader.check_model`)."""

_RESERVED_FIELDS = ("files", "format_version", "created_at")
_RUN_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class ArtifactError(Exception):
    """Base class of artifact errors."""


class RunNotFoundError(ArtifactError, FileNotFoundError):
    """No committed run (no `latest` pointer, or no manifest for the run id)."""


class RunImmutableError(ArtifactError):
    """The run already has a manifest: it cannot be written to again."""


class ChecksumMismatchError(ArtifactError):
    """A file's content does not match the hash recorded in the manifest."""


class ArtifactModelMismatchError(ArtifactError):
    """The artifact was computed on a different model than the one loaded."""


def validate_run_id(run_id: str) -> str:
    """Run ids become key segments: letters, digits, `-_.`, at most 128, no leading dot."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.fullmatch(run_id):
        raise ValueError(
            f"invalid run id {run_id!r}: use 1-128 letters, digits, '-', '_' or '.', not starting with '.'"
        )
    return run_id


def new_run_id(prefix: str = "") -> str:
    """A fresh, sortable run id: `[prefix-]YYYYMMDDTHHMMSSZ-<6 hex>`."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return validate_run_id(f"{prefix + '-' if prefix else ''}{stamp}-{uuid.uuid4().hex[:6]}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _jsonl_bytes(rows: Iterable[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def _run_prefix(run_id: str) -> str:
    return f"{RUNS}/{validate_run_id(run_id)}"


# -- safetensors (bytes API) ---------------------------------------------------------------------


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize tensors (moved to CPU, made contiguous) with string metadata."""
    from safetensors.torch import save  # noqa: PLC0415 (torch import is heavy)

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
    from safetensors.torch import load  # noqa: PLC0415

    # The bytes API returns tensors only; the metadata sits in the JSON header (u64 LE length first).
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    return load(data), dict(header.get("__metadata__") or {})


# -- writing -------------------------------------------------------------------------------------


class RunWriter:
    """Writes the files of one run, records their sha256 and size, and commits the manifest.

    Writing into a run that already has a manifest raises `RunImmutableError`. A run without one
    can be reopened (to resume a job): files already there can be kept with `record_existing`.
    """

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.run_id = validate_run_id(run_id)
        self.run_store = store.child(_run_prefix(run_id))
        self._files: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._committed = False
        self._check_open()

    @property
    def uri(self) -> str:
        return self.run_store.uri

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """What was recorded so far: {relpath: {sha256, bytes}}."""
        with self._lock:
            return {k: dict(v) for k, v in sorted(self._files.items())}

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

    def _record(self, relpath: str, data: bytes) -> dict[str, Any]:
        entry = {"sha256": _sha256(data), "bytes": len(data)}
        with self._lock:
            self._files[relpath] = entry
        return dict(entry)

    def put_bytes(self, relpath: str, data: bytes) -> dict[str, Any]:
        """Write raw bytes; returns the recorded {sha256, bytes}."""
        relpath = self._relpath(relpath)
        if self._committed:
            self._check_open()
        self.run_store.put_bytes(relpath, data)
        return self._record(relpath, data)

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

    def exists(self, relpath: str) -> bool:
        """Whether the file is in storage (recorded or not), e.g. a part written before a restart."""
        return self.run_store.exists(self._relpath(relpath))

    def record_existing(self, relpath: str) -> dict[str, Any]:
        """Hash a file already in storage (written by an earlier attempt) into the manifest."""
        relpath = self._relpath(relpath)
        return self._record(relpath, self.run_store.get_bytes(relpath))

    def commit(self, manifest: Mapping[str, Any] | None = None, *, set_latest: bool = True) -> dict[str, Any]:
        """Write `manifest.json` (the given fields plus `files`, `run_id`, `created_at`,
        `format_version`) after every file, then point `latest` at this run. Returns the manifest.

        `run_id` may be given when it equals this run's id; the other added fields may not."""
        fields_ = dict(manifest or {})
        if fields_.get("run_id", self.run_id) != self.run_id:
            raise ValueError(f"manifest run_id {fields_['run_id']!r} is not this run's id {self.run_id!r}")
        fields_.pop("run_id", None)
        clash = sorted(set(fields_) & set(_RESERVED_FIELDS))
        if clash:
            raise ValueError(f"manifest fields {clash} are set by commit() itself")
        self._check_open()
        full = {
            **fields_,
            "run_id": self.run_id,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": self.files,
        }
        # Fail here, before anything is published, if a field cannot be stored as JSON.
        data = (json.dumps(full, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        self.run_store.put_bytes(MANIFEST, data)
        self._committed = True
        if set_latest:
            self.store.put_text(LATEST, self.run_id + "\n")
        return full


# -- reading -------------------------------------------------------------------------------------


class RunReader:
    """Reads one committed run, verifying every file against its manifest.

    `run_id="latest"` follows the `latest` pointer. A run without a manifest raises
    `RunNotFoundError`: readers never see a half-written run.
    """

    def __init__(self, store: Store, run_id: str = LATEST) -> None:
        self.store = store
        if run_id == LATEST:
            run_id = latest_run_id(store) or ""
            if not run_id:
                raise RunNotFoundError(f"no committed run under {store.uri} (no {LATEST!r} pointer)")
        self.run_id = validate_run_id(run_id)
        self.run_store = store.child(_run_prefix(self.run_id))
        try:
            manifest = self.run_store.get_json(MANIFEST)
        except StoreKeyError:
            raise RunNotFoundError(
                f"run {self.run_id!r} has no {MANIFEST} at {self.run_store.uri}: it does not exist or is incomplete"
            ) from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ArtifactError(
                f"{self.run_store.key_uri(MANIFEST)} is not a valid manifest (no 'files' map)"
            )
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"run {self.run_id!r} has artifact format version {version}; this code reads version {FORMAT_VERSION}"
            )
        self._manifest: dict[str, Any] = manifest

    @property
    def uri(self) -> str:
        return self.run_store.uri

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    @property
    def files(self) -> list[str]:
        """Relative paths of the run's files, sorted."""
        return sorted(self._manifest["files"])

    def has(self, relpath: str) -> bool:
        return relpath in self._manifest["files"]

    def get_bytes(self, relpath: str) -> bytes:
        """The file's bytes after checking them against the manifest."""
        entry = self._manifest["files"].get(relpath)
        if entry is None:
            raise ArtifactError(
                f"{relpath!r} is not listed in the manifest of run {self.run_id!r} at {self.uri}; "
                "only committed files can be read"
            )
        data = self.run_store.get_bytes(validate_key(relpath, what="artifact path"))
        actual = _sha256(data)
        if actual != entry["sha256"]:
            raise ChecksumMismatchError(
                f"{self.run_store.key_uri(relpath)} does not match the manifest of run {self.run_id!r}: "
                f"expected sha256 {entry['sha256']} ({entry['bytes']} bytes), got {actual} ({len(data)} bytes)"
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

    def check_model(self, fingerprint: ModelFingerprint) -> None:
        """Refuse (`ArtifactModelMismatchError`) when this run was made for another model."""
        recorded = self._manifest.get(FINGERPRINT_KEY)
        if recorded is None and isinstance(self._manifest.get("model"), dict):
            recorded = self._manifest["model"].get("fingerprint")
        if not isinstance(recorded, dict):
            raise ArtifactError(
                f"run {self.run_id!r} records no {FINGERPRINT_KEY!r}: cannot check it matches {fingerprint.model_id!r}"
            )
        check_compatible(recorded, fingerprint, run_id=self.run_id)


def latest_run_id(store: Store) -> str | None:
    """The run id in `latest`, or None when nothing was committed yet."""
    try:
        text = store.get_text(LATEST).strip()
    except StoreKeyError:
        return None
    return validate_run_id(text) if text else None


def list_runs(store: Store) -> list[str]:
    """Ids of the committed runs (those with a manifest), sorted."""
    runs = set()
    for key in store.list(f"{RUNS}/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == MANIFEST:
            runs.add(parts[1])
    return sorted(runs)


# -- model identity ------------------------------------------------------------------------------

# Config fields that change with how a model is loaded, not with which model it is.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
        "attn_implementation",
        "quantization_config",
        "device_map",
        "architectures",
    }
)
_SAMPLE_ELEMENTS = 1 << 20
"""Per tensor at most this many elements are hashed (an evenly strided sample)."""


@dataclass(frozen=True)
class ModelFingerprint:
    model_id: str
    """How the model was named when loaded (informative: not compared)."""
    config_sha256: str
    """Hash of the architecture config without load-time fields."""
    weights_sha256: str
    """Hash of a deterministic sample of the weights (embedding and last decoder layer)."""
    hidden_size: int
    num_layers: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelFingerprint:
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"model fingerprint lacks {sorted(missing)}")
        return cls(**{k: data[k] for k in names})

    def describe(self) -> str:
        return (
            f"{self.model_id!r} (hidden size {self.hidden_size}, {self.num_layers} layers, "
            f"config {self.config_sha256[:12]}, weights {self.weights_sha256[:12]})"
        )


def _clean_config(obj: Any) -> Any:
    if isinstance(obj, dict):
        # Keys become strings (as in JSON) so int-keyed maps such as id2label hash the same after a reload.
        return {
            str(k): _clean_config(v)
            for k, v in obj.items()
            if not str(k).startswith("_") and str(k) not in _VOLATILE_CONFIG_KEYS
        }
    if isinstance(obj, (list, tuple)):
        return [_clean_config(v) for v in obj]
    return obj


def config_sha256(config: Any) -> str:
    """Hash of a transformers config (or dict) with sorted keys and no load-time fields."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = json.dumps(_clean_config(data), sort_keys=True, default=str, separators=(",", ":"))
    return _sha256(text.encode("utf-8"))


def _fingerprint_tensors(model: Any) -> list[tuple[str, Any]]:
    """The input embedding, every parameter of the last decoder layer, in a fixed order."""
    from chameleon.model import decoder_layers  # noqa: PLC0415 (imports torch)

    chosen: list[tuple[str, Any]] = []
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None and getattr(embed, "weight", None) is not None:
        chosen.append(("input_embeddings", embed.weight))
    try:
        last = decoder_layers(model)[-1]
        chosen.extend((f"last_layer.{n}", p) for n, p in last.named_parameters())
    except ValueError:
        # Unknown architecture: the last few parameters stand in for the last layer.
        chosen.extend(list(model.named_parameters())[-8:])
    if not chosen:
        raise ValueError("model has no parameters to fingerprint")
    return chosen


def weights_sha256(model: Any) -> str:
    """Hash of a strided sample of the input embedding and the last decoder layer.

    Values are rounded to bfloat16 before hashing, so one checkpoint loaded in float32 on a CPU
    and in bfloat16 on a GPU has one fingerprint (its edits are valid for both); any real change
    of weights (another seed, a fine-tune) changes far more than bfloat16 rounding hides. At most
    `_SAMPLE_ELEMENTS` values per tensor are read: cheap even for an 8B model.
    """
    import torch  # noqa: PLC0415

    h = hashlib.sha256()
    with torch.no_grad():
        for name, param in _fingerprint_tensors(model):
            if param.device.type == "meta":
                raise ValueError(f"cannot fingerprint {name}: its weights are not loaded (meta device)")
            flat = param.detach().reshape(-1)
            step = max(1, -(-flat.numel() // _SAMPLE_ELEMENTS))
            sample = flat[::step].to(torch.bfloat16).to("cpu").contiguous()
            h.update(f"{name}:{tuple(param.shape)}:{step};".encode())
            h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def fingerprint_model(model: Any, model_id: str) -> ModelFingerprint:
    """Identify a loaded causal LM: config hash, weight-sample hash, hidden size, layer count."""
    from chameleon.model import hidden_size, num_layers  # noqa: PLC0415

    return ModelFingerprint(
        model_id=str(model_id),
        config_sha256=config_sha256(model.config),
        weights_sha256=weights_sha256(model),
        hidden_size=hidden_size(model),
        num_layers=num_layers(model),
    )


def check_compatible(
    manifest_fingerprint: Mapping[str, Any] | ModelFingerprint,
    fingerprint: ModelFingerprint,
    *,
    run_id: str | None = None,
) -> None:
    """Raise `ArtifactModelMismatchError` unless the artifact's model is the loaded one.

    `model_id` is not compared (one model may be loaded from a hub id or a local copy); the shape,
    config and weight hashes are.
    """
    made_for = (
        manifest_fingerprint
        if isinstance(manifest_fingerprint, ModelFingerprint)
        else ModelFingerprint.from_dict(manifest_fingerprint)
    )
    differences = [
        what
        for what, a, b in (
            ("hidden size", made_for.hidden_size, fingerprint.hidden_size),
            ("layer count", made_for.num_layers, fingerprint.num_layers),
            ("config", made_for.config_sha256, fingerprint.config_sha256),
            ("weights", made_for.weights_sha256, fingerprint.weights_sha256),
        )
        if a != b
    ]
    if differences:
        run = f" of run {run_id!r}" if run_id else ""
        raise ArtifactModelMismatchError(
            f"the artifacts{run} were made for model {made_for.describe()}, but the loaded model is "
            f"{fingerprint.describe()}; they differ in {', '.join(differences)}. "
            "Serve them with the model they were computed on, or recompute them for this model."
        )
