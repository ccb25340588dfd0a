"""Which edit answers a request, and getting it onto the model's device (no Ray).

`EditLoader.resolve` decides once, at admission, the run and group a request gets (the request's
group, the user's assignment, the fallback, or none), and for a user's own assignment the markers
of the user's marker part (`PublishedRun.user_markers`). `EditLoader.pin` then pins that row (the
group's edit plus the marker part, `PublishedRun.served_edit`) in the `EditCache` of that run's
bank layout, loading the edit from the store on a miss: one read per (run, group, markers)
however many requests wait (single flight), on its own thread pool so a hanging
store never ties up decoding, within one deadline (`admission_timeout_s`), and a failed load is
answered from memory for `edit_failure_ttl_s`. Client messages carry no store detail; it is
logged and kept for the status endpoint (`RunRegistry.record_artifact_error`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from chameleon.core.edit import Edit, EditBank
from chameleon.data.storage import StoreError
from chameleon.serving.config import ServeConfig
from chameleon.serving.edit_cache import CacheFullError, CacheKey, EditCache
from chameleon.serving.metrics import ServingMetrics
from chameleon.serving.protocol import ApiError, PersonalizationDetail
from chameleon.serving.registry import BankSpec, LoadedRun, RunRegistry
from chameleon.serving.replica_api import GenerationRequest

log = logging.getLogger("chameleon.serving")


@dataclass
class Resolution:
    run: LoadedRun | None
    group_id: str | None
    source: str
    """`user` (assignment), `group` (named in the request), `fallback`, or `off`."""
    user: str | None
    markers: tuple[str, ...] = ()
    """The user's marker part (source `user` only: a user's part is never served to a group name)."""

    def describe(self) -> PersonalizationDetail:
        return PersonalizationDetail(
            run_id=self.run.run_id if self.run else None,
            group_id=self.group_id,
            source=self.source,
            user=self.user,
        )


@dataclass
class PinnedEdit:
    """A group's bank row, pinned until `release` (idempotent)."""

    row: int
    cache: EditCache
    spec: BankSpec
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.cache.release(self.row)


def _edit_unusable() -> ApiError:
    return ApiError(503, "the personalization edit for this request cannot be used", "artifact_error")


class EditLoader:
    """Resolution, the edit caches (one per bank layout) and the edit loads of one replica."""

    def __init__(
        self, cfg: ServeConfig, registry: RunRegistry, hidden_size: int, device, metrics: ServingMetrics
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.hidden_size = hidden_size
        self.device = device
        self.metrics = metrics
        self._caches: dict[BankSpec, EditCache] = {}
        self._loading: dict[CacheKey, asyncio.Future] = {}
        # Edit loads get their own threads: a hanging store ties these up, never the default
        # executor that runs every decode step (and tokenization).
        self._load_pool = ThreadPoolExecutor(cfg.edit_load_workers, thread_name_prefix="chameleon-edit-load")
        self._failed: dict[CacheKey, tuple[float, ApiError]] = {}  # key -> (until, answer)

    def resolve(self, request: GenerationRequest) -> Resolution:
        """Which run and group a request gets (decided once, at admission)."""
        user = request.user
        run = self.registry.current
        if request.personalization_off:
            return Resolution(run, None, "off", user)
        if run is None:  # why (store errors, refused runs) is on the authenticated status endpoint
            raise ApiError(
                503,
                "no personalization run is being served yet; "
                "send personalization.off=true for the base model",
                "no_run",
            )
        gid = request.group_id
        if gid is not None:
            if gid not in run.group_ids:
                raise ApiError(
                    404,
                    f"group {gid!r} is not in run {run.run_id!r}",
                    "group_not_found",
                    param="personalization.group_id",
                )
            return Resolution(run, gid, "group", user)
        if user is not None and user in run.user_groups and run.user_groups[user] in run.group_ids:
            return Resolution(run, run.user_groups[user], "user", user, run.published.user_markers(user))
        fb = self.cfg.fallback_group
        return Resolution(run, fb if fb in run.group_ids else None, "fallback", user)

    def cache_for(self, spec: BankSpec) -> EditCache:
        cache = self._caches.get(spec)
        if cache is None:
            bank = EditBank(
                self.hidden_size,
                spec.layers,
                site=spec.site,
                max_rank=spec.max_rank,
                positions=spec.positions,
                device=self.device,
            )
            cache = self._caches[spec] = EditCache(bank, self.cfg.edit_cache_size)
        return cache

    def load_edit(self, run: LoadedRun, group_id: str, markers: tuple[str, ...] = ()) -> Edit:
        return run.published.served_edit(group_id, markers)

    async def pin(self, run: LoadedRun, group_id: str, markers: tuple[str, ...] = ()) -> PinnedEdit:
        """Pin the row of the group's edit plus the marker part of `markers`, loading it on a miss.
        One deadline, `admission_timeout_s`, covers the load and the wait for a free row (FIFO);
        past it: 503 with Retry-After."""
        cache = self.cache_for(run.spec)
        key = (run.run_id, group_id, markers)
        deadline = time.monotonic() + self.cfg.admission_timeout_s

        async def load() -> Edit:
            return await self._load(run, group_id, markers, deadline)

        try:
            # One FIFO line for hits and misses; the edit loads (only if needed) while in line.
            row = await cache.pin(key, load, run.edit, self.cfg.admission_timeout_s)
        except CacheFullError:
            raise ApiError(
                503, "every edit slot is busy with requests in flight; retry shortly", "edit_slots_busy"
            ) from None
        except ValueError as exc:
            log.error("group %r of run %r does not fit the edit bank: %s", group_id, run.run_id, exc)
            self.registry.record_artifact_error(
                f"group {group_id!r} of run {run.run_id!r} does not fit the edit bank: {exc}"
            )
            raise self._remember_failure(key, _edit_unusable()) from None
        st = cache.stats()
        self.metrics.edit_cache(id(cache), st.hits, st.misses, st.evictions)
        return PinnedEdit(row, cache, run.spec)

    def _remember_failure(self, key: CacheKey, err: ApiError) -> ApiError:
        """Answer `err` from memory for `edit_failure_ttl_s` (no download per request)."""
        if self.cfg.edit_failure_ttl_s > 0:
            self._failed[key] = (time.monotonic() + self.cfg.edit_failure_ttl_s, err)
        return err

    def _load_done(self, key: CacheKey, fut: asyncio.Future) -> None:
        self._loading.pop(key, None)
        if not fut.cancelled():
            fut.exception()  # retrieved: a load every waiter gave up on is not an unhandled error

    async def _load(self, run: LoadedRun, group_id: str, markers: tuple[str, ...], deadline: float) -> Edit:
        """The group's edit with the marker part, read once however many requests wait for it, on
        the load pool, by `deadline` (time.monotonic)."""
        key = (run.run_id, group_id, markers)
        failed = self._failed.get(key)
        if failed is not None:
            if failed[0] > time.monotonic():
                raise failed[1]
            del self._failed[key]
        fut = self._loading.get(key)
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(self._load_pool, self.load_edit, run, group_id, markers)
            self._loading[key] = fut
            fut.add_done_callback(lambda f: self._load_done(key, f))
        try:
            # shield: a request giving up never cancels the load others wait for.
            return await asyncio.wait_for(asyncio.shield(fut), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ApiError(
                503,
                "the personalization edit for this request is still loading; retry shortly",
                "edit_loading",
            ) from None
        except StoreError as exc:
            log.warning("cannot read group %r of run %r: %s", group_id, run.run_id, exc)
            self.registry.record_artifact_error(f"store error reading group {group_id!r}: {exc}")
            raise self._remember_failure(
                key, ApiError(503, "the artifact store is unavailable; retry shortly", "store_unavailable")
            ) from None
        except Exception as exc:  # a checksum, format or size problem (or a bug): never a 500
            log.error("refused the edit of group %r of run %r: %r", group_id, run.run_id, exc)
            self.registry.record_artifact_error(
                f"refused the edit of group {group_id!r} of run {run.run_id!r}: {type(exc).__name__}: {exc}"
            )
            raise self._remember_failure(key, _edit_unusable()) from None

    def status(self) -> dict[str, Any]:
        """Loads in flight, failures remembered, and each cache's occupancy (the status endpoint)."""
        return {
            "edit_loads_in_flight": len(self._loading),
            "edit_failures_cached": len(self._failed),
            "edit_caches": [
                {
                    "layers": list(spec.layers),
                    "site": spec.site,
                    "waiting": cache.waiting(),
                    **cache.stats().to_dict(),
                }
                for spec, cache in self._caches.items()
            ],
        }
