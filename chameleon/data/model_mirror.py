"""Model weights from S3, for clusters without access to the Hugging Face hub: once per node.

    s3://bucket/models/qwen2.5-1.5b/    config.json, tokenizer files, *.safetensors, ...
                                        chameleon-model.json   what `mirror_model` uploaded: every
                                        file's sha256 and size, and the model's fingerprint

With `model.name_or_path: s3://bucket/models/qwen2.5-1.5b/` every loader (the map actors, the
serving replicas, the in-process driver) calls `load_model_for`: the first loader on a node
downloads the files into the node's model cache (`model.cache_dir`, else `$CHAMELEON_CACHE`, else
`~/.cache/chameleon`; on KubeRay a volume every pod of the node mounts), under a file lock, so
loaders that start together wait for that one download instead of making their own. Each file is
checked against its recorded sha256 while it is written; the copy becomes visible (renamed into
place, then marked done) only when complete, so a loader killed halfway leaves nothing another
would load. After loading, the model's fingerprint (`core.fingerprint`) must equal the one the
mirror recorded: weights that load but are not the mirrored model are refused.

Without a `chameleon-model.json` (a prefix filled by `aws s3 sync`) every object under the prefix
is downloaded and only the fingerprint checks of the runs protect what is served.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from filelock import FileLock
from transformers import AutoConfig

from chameleon.config import ModelConfig
from chameleon.core.fingerprint import (
    ModelFingerprint,
    ModelMismatchError,
    check_compatible,
    fingerprint_model,
)
from chameleon.core.model import default_cache_dir, load_model
from chameleon.data.storage import Store, open_store

MIRROR_RECORD = "chameleon-model.json"
"""Written last by `mirror_model`: {"files": {name: {"sha256", "bytes"}}, "fingerprint": {...}}."""
DONE = ".chameleon-fetched.json"
"""Written into a node's copy when it is complete (the mirror's URI and record)."""


def is_mirrored(name_or_path: str) -> bool:
    """Whether a model name is an S3 mirror (`s3://bucket/prefix`)."""
    return name_or_path.startswith("s3://")


@dataclass(frozen=True)
class FetchedModel:
    path: Path
    """The node's complete copy."""
    downloaded: bool
    """Whether this call downloaded it (False: another loader on the node had)."""
    fingerprint: ModelFingerprint | None
    """What the mirror recorded (None for a mirror without a record)."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _safe_name(name: str) -> str:
    """A file name from the mirror, refused when it would leave the model's folder."""
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"model mirror lists an unsafe file name {name!r}")
    return name


def mirror_model(local_dir: str | Path, store: Store) -> dict[str, Any]:
    """Upload a model folder (`save_pretrained` output) to `store` with its record (files'
    sha256 and sizes, and the fingerprint of the model loaded from the folder); the record last."""
    local_dir = Path(local_dir)
    files = {}
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        name = path.relative_to(local_dir).as_posix()
        if name == MIRROR_RECORD or name.startswith("."):
            continue
        data = path.read_bytes()
        store.put_bytes(name, data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    model, _tok = load_model(ModelConfig(name_or_path=str(local_dir), device="cpu", dtype="bfloat16"))
    record = {"files": files, "fingerprint": fingerprint_model(model, str(local_dir)).to_dict()}
    store.put_json(MIRROR_RECORD, record)
    return record


def _node_copy(uri: str, cache_dir: str | None) -> Path:
    root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "models"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", uri.removeprefix("s3://").strip("/"))[-64:]
    return root / f"{slug}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def _record_fingerprint(record: dict[str, Any] | None) -> ModelFingerprint | None:
    fp = (record or {}).get("fingerprint")
    return ModelFingerprint.from_dict(fp) if fp else None


def fetch_model(
    uri: str, *, cache_dir: str | None = None, store: Store | None = None, lock_timeout_s: float = 7200.0
) -> FetchedModel:
    """The node's copy of the mirror at `uri`, downloaded by the first caller on the node (the
    others wait on the lock, up to `lock_timeout_s`). `store`: an open store for `uri` (default:
    opened from the URI with the environment's S3 settings)."""
    target = _node_copy(uri, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock", timeout=lock_timeout_s):
        done = target / DONE
        if done.is_file():
            return FetchedModel(target, False, _record_fingerprint(json.loads(done.read_text())["record"]))
        store = store or open_store(uri)
        record = store.get_json(MIRROR_RECORD) if store.exists(MIRROR_RECORD) else None
        names = sorted(record["files"]) if record else sorted(store.list(""))
        if not names:
            raise FileNotFoundError(f"no model files under {uri}")
        partial = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
        try:
            for name in names:
                path = partial / _safe_name(name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(store.get_bytes(name))
                expected = record["files"][name] if record else None
                if expected and (
                    path.stat().st_size != expected["bytes"] or _sha256_file(path) != expected["sha256"]
                ):
                    raise ValueError(f"{uri}: {name} differs from the mirror's record (size or sha256)")
            (partial / DONE).write_text(json.dumps({"uri": uri, "record": record}))
            if target.exists():  # an earlier copy that never completed
                shutil.rmtree(target)
            partial.rename(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return FetchedModel(target, True, _record_fingerprint(record))


def load_model_for(cfg: ModelConfig):
    """`core.model.load_model`, for an S3 mirror too: (model, tokenizer). A mirrored model is
    fetched once per node (`fetch_model`) and refused (`ModelMismatchError`) when its loaded
    weights are not the model the mirror recorded."""
    if not is_mirrored(cfg.name_or_path):
        return load_model(cfg)
    fetched = fetch_model(cfg.name_or_path, cache_dir=cfg.cache_dir)
    model, tok = load_model(cfg.model_copy(update={"name_or_path": str(fetched.path)}))
    if fetched.fingerprint is not None:
        try:
            check_compatible(fetched.fingerprint, fingerprint_model(model, cfg.name_or_path))
        except ModelMismatchError as exc:
            with FileLock(f"{fetched.path}.lock"):  # the next loader on the node downloads it again
                (fetched.path / DONE).unlink(missing_ok=True)
            raise ModelMismatchError(
                f"the node's copy of {cfg.name_or_path} ({fetched.path}) is not the model the mirror "
                f"recorded; it will be downloaded again: {exc}"
            ) from exc
    return model, tok


def mirrored_config(uri: str) -> Any:
    """The transformers config of a mirrored model, read without fetching its weights."""
    data = open_store(uri).get_bytes("config.json")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_bytes(data)
        return AutoConfig.from_pretrained(tmp)
