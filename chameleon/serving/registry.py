"""Runs a replica serves: loading and checking a committed run, and following `latest`.

`load_run` opens a run for serving (model fingerprint, manifest sanity, id grammar, checksummed
assignments); `RunRegistry` holds the run being served and moves to a new one when the store's
`latest` pointer changes. A run that cannot be served is refused and the previous one keeps
serving. No Ray here.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from chameleon.config import EditConfig
from chameleon.core.fingerprint import ModelFingerprint, ModelMismatchError
from chameleon.data.artifacts import ArtifactError, RunNotFoundError, RunReader, latest_run_id
from chameleon.data.manifest import BankSpec
from chameleon.data.published import PublishedRun
from chameleon.data.storage import Store

log = logging.getLogger("chameleon.serving")


@dataclass
class LoadedRun:
    run_id: str
    published: PublishedRun
    user_groups: dict[str, str]
    group_ids: frozenset[str]
    spec: BankSpec
    edit: EditConfig
    """How the run's edits are applied (its manifest's `edit` section)."""
    loaded_at: float
    warnings: list[str] = field(default_factory=list)


def load_run(
    store: Store,
    run_id: str,
    fingerprint: ModelFingerprint,
    num_layers: int,
    fallback_group: str | None,
    group_cache_size: int | None = None,
) -> LoadedRun:
    """Open a committed run for serving: model check, manifest sanity, assignments (checksummed).
    `group_cache_size` bounds the group edits its `PublishedRun` keeps in host memory.

    The manifest's types (site, positions, rank, group ids) are checked when it is read
    (`chameleon.data.manifest`); what depends on the loaded model is checked here."""
    reader = RunReader(store, run_id)
    reader.check_model(fingerprint)
    m = reader.manifest
    spec = m.bank_spec()
    if m.hidden_size != fingerprint.hidden_size:
        raise ArtifactError(
            f"run {run_id!r} has hidden size {m.hidden_size}, the model {fingerprint.hidden_size}"
        )
    if not all(0 <= x < num_layers for x in spec.layers):
        raise ArtifactError(
            f"run {run_id!r} captured layers {list(spec.layers)} outside the model's {num_layers}"
        )
    if not (math.isfinite(m.edit.alpha) and math.isfinite(m.edit.beta)):
        raise ArtifactError(
            f"run {run_id!r} has non-finite edit strengths alpha/beta {m.edit.alpha}/{m.edit.beta}"
        )
    published = PublishedRun(reader, group_cache_size=group_cache_size)
    assignments = published.assignments()  # verified against the manifest's checksum
    user_groups = {str(u): str(row["group_id"]) for u, row in assignments.items()}
    run = LoadedRun(
        run_id=reader.run_id,
        published=published,
        user_groups=user_groups,
        group_ids=frozenset(m.group_ids),
        spec=spec,
        edit=m.edit,
        loaded_at=time.time(),
    )
    unknown = sorted({g for g in user_groups.values() if g not in run.group_ids})
    if unknown:
        run.warnings.append(f"assignments name groups the run does not publish: {unknown[:5]}")
    if fallback_group and fallback_group not in run.group_ids:
        run.warnings.append(
            f"fallback group {fallback_group!r} is not in run {run.run_id!r}: unknown users get the base model"
        )
    return run


class RunRegistry:
    """The run a replica serves; follows `latest` when asked to. Thread-safe.

    A run that cannot be served (another model, a checksum mismatch, a broken manifest) is
    refused once and remembered; the previous run keeps serving. Errors reaching the store are
    transient: the next refresh tries again.
    """

    def __init__(
        self,
        store: Store,
        run: str,
        fingerprint: ModelFingerprint,
        num_layers: int,
        fallback_group: str | None,
        group_cache_size: int | None = None,
    ) -> None:
        self.store = store
        self.group_cache_size = group_cache_size
        self.requested = run
        self.fingerprint = fingerprint
        self.num_layers = num_layers
        self.fallback_group = fallback_group
        self.current: LoadedRun | None = None
        self.target: str | None = None
        self.refused: dict[str, str] = {}
        self.last_error: str | None = None
        self.last_refresh: float | None = None
        self.artifact_errors: deque[tuple[float, str]] = deque(maxlen=20)
        self.switches = 0
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Check the pointer (or the pinned run) and load a new run; True when it switched."""
        with self._lock:
            self.last_refresh = time.time()
            try:
                target = latest_run_id(self.store) if self.requested == "latest" else self.requested
            except Exception as exc:  # storage unreachable, a malformed pointer, ...
                self.last_error = f"cannot read the latest pointer under {self.store.uri}: {exc}"
                return False
            if target is None:
                self.last_error = f"no committed run under {self.store.uri} (no 'latest' pointer yet)"
                return False
            self.target = target
            if self.current is not None and self.current.run_id == target:
                self.last_error = None
                return False
            if target in self.refused:
                return False
            try:
                run = load_run(
                    self.store,
                    target,
                    self.fingerprint,
                    self.num_layers,
                    self.fallback_group,
                    self.group_cache_size,
                )
            except RunNotFoundError as exc:
                self.last_error = str(exc)
                return False
            except (ArtifactError, ModelMismatchError, ValueError) as exc:
                self.refused[target] = f"{type(exc).__name__}: {exc}"
                self.last_error = None
                log.error("refusing run %s: %s", target, exc)
                return False
            except Exception as exc:
                self.last_error = f"cannot load run {target!r}: {type(exc).__name__}: {exc}"
                return False
            self.current, self.last_error = run, None
            self.switches += 1
            log.info(
                "serving run %s (%d groups, %d users)", run.run_id, len(run.group_ids), len(run.user_groups)
            )
            return True

    def on_pinned_run(self) -> bool:
        """A pinned run (not `latest`) is requested and is the one being served."""
        run = self.current
        return self.requested != "latest" and run is not None and run.run_id == self.requested

    def record_artifact_error(self, message: str) -> None:
        self.artifact_errors.append((time.time(), message))

    def status(self) -> dict[str, Any]:
        run = self.current
        recent = [msg for t, msg in self.artifact_errors if time.time() - t < 600]
        problems = []
        if self.target is not None and self.target in self.refused:
            problems.append(f"run {self.target!r} refused: {self.refused[self.target]}")
        if self.last_error:
            problems.append(self.last_error)
        problems += recent
        state = "unavailable" if run is None else ("degraded" if problems else "ok")
        return {
            "status": state,
            "requested_run": self.requested,
            "latest": self.target,
            "run_id": run.run_id if run else None,
            "on_target": run is not None and run.run_id == self.target,
            "run": None
            if run is None
            else {
                "run_id": run.run_id,
                "groups": len(run.group_ids),
                "users": len(run.user_groups),
                "layers": list(run.spec.layers),
                "site": run.spec.site,
                "loaded_at": run.loaded_at,
                "warnings": run.warnings,
            },
            "refused_runs": dict(self.refused),
            "last_error": self.last_error,
            "artifact_errors": recent,
            "problems": problems,
            "run_switches": self.switches,
            "last_refresh": self.last_refresh,
        }
