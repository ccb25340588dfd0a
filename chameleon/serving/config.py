"""Settings of the serving application: the `args` of a Serve config's application.

The base model is the job's own `model:` section (`chameleon.config.ModelConfig`), so whatever
loads a model for the job (a hub revision, `device_map` sharding, `trust_remote_code`, a
`cache_dir`) loads it for serving too. A plain string is short for `{name_or_path: <string>}`:

    args:                                  args:
      store: s3://bucket/prefix              store: s3://bucket/prefix
      model: Qwen/Qwen2.5-1.5B-Instruct      model: {name_or_path: Qwen/Qwen2.5-1.5B-Instruct, dtype: bfloat16}

Left out, the model name, revision and dtype are those recorded by the run served
(`chameleon.serving.run_model`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from chameleon.config import EMBEDDED_MODEL, GpuSetting, ModelConfig
from chameleon.data.ids import ID_RULE, is_valid_id

_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _check_run(v: str) -> str:
    if v != "latest" and not is_valid_id(v):
        raise ValueError(f"run must be 'latest' or a run id ({ID_RULE}), got {v!r}")
    return v


_MOVED_TO_MODEL = ("revision", "dtype", "device")
"""Top-level fields of earlier versions that now live in the `model` section."""
_REMOVED = ("engine", "batch_wait_timeout_s")
"""Fields of the retired `engine: static` path: one decode path (continuous batching) is left."""


class ServeConfig(BaseModel):
    """Settings of the serving application (the `args` of a Serve config's application)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    store: str
    """Where runs are published: `s3://bucket/prefix` or a local directory (the job's `--store`)."""
    s3_endpoint: str | None = None
    """S3-compatible endpoint URL; default `CHAMELEON_S3_ENDPOINT`, else `AWS_ENDPOINT_URL`, else AWS.
    Credentials come from the usual AWS environment variables of the replicas."""
    run: str = "latest"
    """Run id to serve, or `latest` to follow the store's `latest` pointer without restarts."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Base model: the job's `model:` section (`name_or_path`, `revision`, `dtype`, `device`,
    `device_map`, `cache_dir`, `trust_remote_code`); a string is short for `{name_or_path: ...}`.
    Must be the model the run was computed on (its fingerprint is checked against each run's
    manifest); `name_or_path` (with `revision`) and `dtype` left unset are taken from the manifest
    of the run served (`chameleon.serving.run_model`)."""
    served_model_name: str | None = None
    """The `model` clients send and `/v1/models` lists; default: the model's name."""
    api_key_env: str | None = "CHAMELEON_API_KEY"
    """Environment variable (read by the ingress replicas) holding the bearer token. Fail closed:
    when it is unset or empty (or `api_key_env` is null) the server refuses to start, unless
    `allow_unauthenticated` says otherwise."""
    allow_unauthenticated: bool = False
    """Serve without a bearer token when no key is configured (`--allow-unauthenticated`); only
    for a loopback demo or behind a gateway that authenticates."""
    personalization_detail: Literal["minimal", "full"] = "minimal"
    """What responses say about personalization (`personalization` field, `x-chameleon-*` headers).
    `minimal`: only what the caller already knows (the run id, the group it named, `off`); whether a
    `user` is in the data and which group it is in stay hidden. `full`: the resolved group and
    its source (`user`, `fallback`), for trusted callers and tests."""
    max_batch_size: int = Field(32, ge=1, le=4096)
    """Rows decoded together: the running batch of the replica's continuous-batching engine."""
    max_prefill_tokens: int = Field(8192, ge=1)
    """Prefill token budget of one engine step: rows admitted together × their longest prompt (as
    vLLM's `max_num_batched_tokens`); a longer prompt is prefilled alone. Bounds the memory and
    the time of a step, so a burst of long prompts never fails or stalls the running streams."""
    engine_stall_timeout_s: float = Field(120.0, gt=0.0)
    """The health check fails when requests wait and no decode step has finished for this long
    (a wedged device or decode thread); a dead decode loop fails it at once."""
    stream_interval_s: float = Field(0.02, ge=0.0, le=1.0)
    """A stream's tokens after the first are gathered this long before they
    cross to the ingress (one message per interval instead of one per token; 0 = every token)."""
    log_requests: bool = True
    """One JSON log line per finished request (run, group, source, tokens, queue wait, latency)."""
    edit_cache_size: int = Field(256, ge=1)
    """Group edits resident per replica (bank rows besides the identity); least recently used
    unpinned rows are reused."""
    max_prompt_tokens: int = Field(4096, ge=1)
    """Longer prompts are refused with 400."""
    max_tokens_limit: int = Field(1024, ge=1)
    """Largest `max_tokens` a request may ask for (400 above it)."""
    default_max_tokens: int = Field(256, ge=1)
    """`max_tokens` of requests that give none (capped by `max_tokens_limit` and the context)."""
    max_request_bytes: int = Field(1 << 20, ge=1024)
    """Larger request bodies are refused with 413."""
    fallback: str = "base"
    """What users without an assignment get: `base` (no edit) or `group:<group_id>`."""
    refresh_interval_s: float = Field(30.0, gt=0.0)
    """How often a replica checks the store's `latest` pointer (and retries a run that failed to load)."""
    admission_timeout_s: float = Field(10.0, gt=0.0)
    """Deadline of a request's admission: loading its group's edit from the store and waiting for
    a free edit row. Past it the request gets 503 with `Retry-After`; a slow or dead store never
    holds a request (nor any other request) longer."""
    edit_load_workers: int = Field(4, ge=1, le=64)
    """Threads per replica that read group edits from the store: their own pool, so a hanging store
    ties up these and never the threads that decode."""
    edit_failure_ttl_s: float = Field(10.0, ge=0.0)
    """A group edit that failed to load (corrupt, unreadable) is answered 503 from memory for this
    long before the store is asked again."""
    retry_after_s: int = Field(2, ge=1, le=3600)
    """`Retry-After` of 503/429 answers that a retry may cure (overload, a cold group while the
    store is slow)."""
    max_queued_requests: int = Field(512, ge=-1)
    """Requests queued per caller (proxy, ingress handle) beyond `max_ongoing_requests`; past it
    new requests get 503 with `Retry-After` at once (-1: unbounded)."""
    request_timeout_s: float = Field(280.0, gt=0.0)
    """A request (whole answer, also streamed) taking longer ends with 408 (or, once streaming, an
    error event); below the proxy's `request_timeout_s` (300 in cluster/serve-config.yaml), so the
    client gets this clear answer rather than the proxy's."""
    max_prompt_chars: int | None = Field(None, ge=1)
    """Prompts with more characters are refused before tokenizing (default: 16 × max_prompt_tokens)."""
    health_check_period_s: float = Field(10.0, gt=0.0)
    """How often Serve checks a model replica (`check_health`)."""
    health_check_timeout_s: float = Field(30.0, gt=0.0)
    """A model replica whose device does not answer within this is restarted by Serve."""
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0.0)
    """How long a stopping replica lets requests in flight finish before it ends them."""
    num_replicas: int = Field(1, ge=1)
    """Model replicas (`ChameleonServer`); a Serve config's `deployments:` entry overrides it."""
    num_gpus: GpuSetting = "auto"
    """GPUs per model replica. `auto`: 1 when the Ray cluster has GPUs (or its autoscaler can add
    them), else 0 (CPU); a fraction (0.5) puts two replicas of a small model on one GPU. A number
    > 0 on a cluster without GPUs stops the deployment at once."""
    num_cpus: float = Field(1.0, ge=0.0)
    """CPUs per model replica; on CPU also the number of torch threads."""
    max_ongoing_requests: int = Field(256, ge=1)
    """Concurrent requests per replica (ingress and model); keep it above `max_batch_size`."""

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [k for k in _MOVED_TO_MODEL if k in data]
            if moved:
                fields = ", ".join(f"model.{k}" for k in moved)
                raise ValueError(f"{', '.join(moved)} belong in the model section now: set {fields}")
            removed = [k for k in _REMOVED if k in data]
            if removed:
                raise ValueError(
                    f"{', '.join(removed)}: removed with the static engine; every replica runs the "
                    "continuous-batching engine (drop the setting)"
                )
        return data

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"name_or_path": v} if isinstance(v, str) else v

    @field_validator("run")
    @classmethod
    def _run(cls, v: str) -> str:
        return _check_run(v)

    @field_validator("fallback")
    @classmethod
    def _fallback(cls, v: str) -> str:
        if v == "base":
            return v
        kind, _, gid = v.partition(":")
        if kind != "group" or not is_valid_id(gid):
            raise ValueError(
                f"fallback must be 'base' or 'group:<group_id>' (group id: {ID_RULE}), got {v!r}"
            )
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is not None and v != "" and not _ENV_RE.fullmatch(v):
            raise ValueError(f"api_key_env must be an environment variable name, got {v!r}")
        return v or None

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})"
            )
        return self

    @property
    def prompt_char_limit(self) -> int:
        return self.max_prompt_chars or 16 * self.max_prompt_tokens

    @property
    def fallback_group(self) -> str | None:
        return self.fallback.partition(":")[2] if self.fallback.startswith("group:") else None

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        name = self.model.name_or_path
        if name == EMBEDDED_MODEL:
            return EMBEDDED_MODEL.partition(":")[2]
        if name.startswith("s3://"):  # a model mirror: its folder's name
            return name.rstrip("/").rpartition("/")[2]
        path = Path(name)
        return path.name if path.is_absolute() or name.startswith(".") else name


class ServeUserConfig(BaseModel):
    """The `user_config` of the `ChameleonServer` deployment in a Serve config: what Serve changes
    on running replicas (`ChameleonServer.reconfigure`) without restarting them or reloading the
    model. A key left out keeps its current value.

        deployments:
          - name: ChameleonServer
            user_config:
              run: 20250101T000000Z-a1b2c3     # or `latest`: follow the store's pointer
    """

    model_config = ConfigDict(extra="forbid")

    run: str | None = None
    """Run id to serve, or `latest`; overrides the application's `args.run`."""

    @field_validator("run")
    @classmethod
    def _run(cls, v: str | None) -> str | None:
        return None if v is None else _check_run(v)
