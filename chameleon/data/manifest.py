"""A run's manifest, typed: the one contract between the job that publishes a run and everything
that reads it (serving, evaluation, forget, the CLIs).

As Hugging Face's `PretrainedConfig` is to `config.json`, `RunManifest` is to `manifest.json`:

    manifest = RunManifest(model=..., captured_layers=[...], edit=cfg.edit, groups=[...], ...)
    writer.commit(manifest)                       # stamps run_id, format_version, created_at, files
    RunReader(store, run_id).manifest             # -> RunManifest (attributes, never string keys)
    RunManifest.from_json(text) / manifest.to_json()

`format_version` is the version field: `FORMAT_VERSION` is what this code writes and
`READABLE_VERSIONS` what it reads. A manifest of another version, or one whose fields do not fit
the model, is refused with a message naming the run and what is wrong (`ManifestError`).

Versions:
  2  files at their logical paths (a file entry has no `key`); groups without `n_members`, no
     `min_contributors` / `unpublished_groups`; an `edit` section without `form` is the projection
     edit (the only form when the field did not exist). Read: the missing fields take those values.
  3  files in attempt folders, each entry names its object in `key` (what the job writes today).

The users' own edits are written and read by `data.user_shards`.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer

from chameleon.config import ChameleonConfig, EditConfig
from chameleon.core.fingerprint import ModelFingerprint
from chameleon.data.ids import is_valid_id

FORMAT_VERSION = 3
"""Bumped when the layout or the manifest changes incompatibly (see the module docstring)."""
READABLE_VERSIONS = (2, 3)
"""Versions this code reads."""


class ManifestError(ValueError):
    """A manifest this code cannot read: another format version, or fields that do not fit."""


class _Part(BaseModel):
    """A manifest section: unknown fields refused; optional fields left out of the JSON when unset."""

    # NaN stays NaN (a calibration without held-out texts has no NLL), as `json.dumps` writes it.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")
    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_unset_optionals(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if not (v is None and k in self._omit_if_none)}


class FileEntry(_Part):
    """One file of the run: its hash, its size and the object holding it."""

    _omit_if_none = frozenset({"key"})
    sha256: str
    bytes: int = Field(ge=0)
    key: str | None = None
    """The object below the run's folder (version 2: none, the file sits at its logical path)."""

    def object_key(self, relpath: str) -> str:
        return self.key if self.key is not None else relpath


class ModelInfo(_Part):
    id: str
    """The model's name or path as the job was given it."""
    revision: str | None = None
    fingerprint: dict[str, Any]
    """`chameleon.core.fingerprint.ModelFingerprint`, as a dict (`RunManifest.fingerprint`)."""


class GroupCalibration(_Part):
    """The layer and strength calibration chose for a group, with the NLLs it compared."""

    layer: int
    strength: float
    nll: float
    base_nll: float


class GroupEntry(_Part):
    """One published group edit (its tensors: `groups/<group_id>.safetensors`)."""

    _omit_if_none = frozenset({"n_members", "calibration"})
    group_id: str
    n_users: int = Field(ge=0)
    """Users whose pairs entered the edit (the privacy floor counts these)."""
    n_members: int | None = None
    """Users assigned to the group (version 2: not recorded)."""
    n_pairs: int = Field(ge=0)
    layers: list[int]
    rank: list[int]
    form: Literal["projection", "additive", "norm_preserving"]
    calibration: GroupCalibration | None = None

    @field_validator("group_id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        if not is_valid_id(v):
            raise ValueError(f"invalid group id {v!r}")
        return v


class UnpublishedGroup(_Part):
    """A group below the privacy floor (`groups.min_contributors`) and what became of it."""

    _omit_if_none = frozenset({"into"})
    group_id: str
    contributors: int
    members: int
    action: Literal["merged", "dropped"]
    into: str | None = None
    """`merged`: the group its members joined."""


class Counts(_Part):
    """How many records, users, partitions, groups and pairs the run saw and kept."""

    _omit_if_none = frozenset({"records", "rejected", "partitions_failed", "derived_from"})
    records: int | None = None
    accepted: int
    rejected: int | None = None
    partitions: int = Field(ge=0)
    partitions_resumed: int = 0
    partitions_failed: int | None = None
    users_reused: int = 0
    """Users whose per-user results a refresh (`--update-from`) took from its source run."""
    derived_from: str | None = None
    """A run reduced from another run's partitions (the evaluation's derived runs): its id."""
    users_mapped: int
    users_failed: int
    users_with_edit: int
    groups: int
    groups_unpublished: int = 0
    pairs: int
    pairs_kept: int


class ForgetSource(_Part):
    """A run made by `chameleon forget`: the run it was copied from, minus how many accepted users
    and how many rejects."""

    source_run: str
    users_removed: int
    rejects_removed: int = 0


class BankSpec(_Part):
    """The layout of an edit bank: runs with the same spec share one (usually every run of a
    job config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layers: tuple[int, ...]
    site: Literal["mlp", "residual"]
    max_rank: int = Field(ge=1)
    positions: Literal["last", "all"]


class RunManifest(_Part):
    """`manifest.json` of a committed run (see the module docstring)."""

    _omit_if_none = frozenset({"min_contributors", "job_spec", "forget", "edit_parts", "marker_parts"})
    model: ModelInfo
    hidden_size: int = Field(ge=1)
    captured_layers: list[int] = Field(min_length=1)
    site: Literal["mlp", "residual"]
    max_rank: int = Field(ge=1)
    edit: EditConfig
    """How the edits are applied (serving reads alpha, beta, centered, positions from here)."""
    prompt_version: str
    groups: list[GroupEntry]
    min_contributors: int | None = None
    """The privacy floor the groups were published under (version 2: not recorded)."""
    unpublished_groups: list[UnpublishedGroup] = []
    user_shards: list[str]
    counts: Counts
    timings_s: dict[str, float]
    config: dict[str, Any]
    """The run's whole `ChameleonConfig`, as dumped (`chameleon_config()` validates it)."""
    job_spec: dict[str, Any] | None = None
    """What a job run was made from (`chameleon.job.spec`); runs made by forget or derived by the
    evaluation have none."""
    forget: ForgetSource | None = None
    edit_parts: dict[str, Any] | None = None
    """`edit.composition: residual` only: the global part's layer and calibration curve, where the
    global direction came from, and how many users have their own residual strength
    (`job.publish.edit_parts_manifest`)."""
    marker_parts: dict[str, Any] | None = None
    """Runs with marker parts (`edit.markers`) only: `markers`, `layers` and `strength` of the
    marker directions in `markers.safetensors`, the `n_queries` they are the mean over, and how
    many `users` each marker's part reaches (`job.publish.marker_parts_manifest`)."""
    # The envelope, stamped by `RunWriter.commit`.
    run_id: str = ""
    format_version: int = FORMAT_VERSION
    created_at: str = ""
    files: dict[str, FileEntry] = {}

    @field_validator("edit", mode="before")
    @classmethod
    def _edit_before_forms(cls, v: Any) -> Any:
        # Version 2 runs made before edit forms existed: the projection edit was the only one.
        if isinstance(v, dict) and "form" not in v:
            return {**v, "form": "projection"}
        return v

    # -- reading -----------------------------------------------------------------------------

    @property
    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint.from_dict(self.model.fingerprint)

    @property
    def group_ids(self) -> list[str]:
        return [g.group_id for g in self.groups]

    def chameleon_config(self) -> ChameleonConfig:
        """The run's config as a `ChameleonConfig` (refused when this code no longer accepts it)."""
        return ChameleonConfig.model_validate(self.config)

    def bank_spec(self) -> BankSpec:
        """The edit bank this run's edits fit in."""
        marker_layers = self.marker_parts["layers"] if self.marker_parts else []
        return BankSpec(
            layers=tuple(sorted(set(self.captured_layers) | set(marker_layers))),
            site=self.site,
            max_rank=self.max_rank,
            positions=self.edit.positions,
        )

    # -- JSON (as `PretrainedConfig.to_json_string` / `from_json_file`) -----------------------

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, run_id: str = "?") -> RunManifest:
        """Validate a manifest read from storage; `ManifestError` names the run and the problem."""
        if not isinstance(data, dict):
            raise ManifestError(f"run {run_id!r}: manifest.json is not a JSON object")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ManifestError(
                f"run {run_id!r} has artifact format version {version}; this code reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} (rerun the job with this code to publish it again)"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise ManifestError(
                f"run {run_id!r} has a manifest that does not fit format version {version}: {problems}"
            ) from None

    @classmethod
    def from_json(cls, text: str | bytes, *, run_id: str = "?") -> RunManifest:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ManifestError(f"run {run_id!r}: manifest.json is not valid JSON ({exc})") from None
        return cls.from_dict(data, run_id=run_id)
