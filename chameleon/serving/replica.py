"""The model replica's core, without Ray: it composes one concern per module.

`ModelServer` is what a `ChameleonServer` replica (chameleon.serving.app) holds: the model and
tokenizer, the `RunRegistry` (which run is served; chameleon.serving.registry), and

    admission    (chameleon.serving.admission)    prompt tokens within the limits, sampling resolved
    edit loading (chameleon.serving.edit_loader)  run + group resolution, pinned bank rows, loads
    the engine   (chameleon.serving.engine)       one continuous batch for every group

A `GenerationRequest` (chameleon.serving.replica_api) is *admitted* once (`admit`): its run and
group are resolved against the run being served at that moment and its bank row is pinned, so a
switch of `latest` never mixes runs inside one request and never evicts a row a batch still
reads. `events` then streams it through the engine as typed events (`Started`, `Generated`,
`Finished`, or `Failed`) and releases the pinned row on every exit path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from chameleon.core.fingerprint import fingerprint_model
from chameleon.core.model import hidden_size, model_device, num_layers
from chameleon.data.capabilities import check_store
from chameleon.data.model_mirror import load_model_for
from chameleon.data.storage import Store, open_store
from chameleon.serving.admission import Admission, PromptLimits
from chameleon.serving.config import ServeConfig
from chameleon.serving.decoder import Delta, GenItem, SamplingError, default_eos_ids
from chameleon.serving.edit_loader import EditLoader, Resolution
from chameleon.serving.engine import Engine, EngineDeadError
from chameleon.serving.metrics import NULL_METRICS, ServingMetrics
from chameleon.serving.protocol import ApiError
from chameleon.serving.registry import RunRegistry
from chameleon.serving.replica_api import (
    Failed,
    Finished,
    Generated,
    GenerationRequest,
    ReplicaEvent,
    Started,
)
from chameleon.serving.sampling import model_sampling_defaults

log = logging.getLogger("chameleon.serving")


class ModelServer:
    """Model, tokenizer, runs, admission, edit loading and the engine of one replica (no Ray)."""

    def __init__(
        self, cfg: ServeConfig, store: Store | None = None, metrics: ServingMetrics = NULL_METRICS
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.store = (
            store
            if store is not None
            else open_store(cfg.store, **({"endpoint_url": cfg.s3_endpoint} if cfg.s3_endpoint else {}))
        )
        self.store_capabilities = check_store(self.store, role="server")  # reported, never refused
        t0 = time.perf_counter()
        self.model, self.tok = load_model_for(cfg.model)
        self.load_seconds = time.perf_counter() - t0
        self.device = model_device(self.model)
        self.num_layers = num_layers(self.model)
        self.fingerprint = fingerprint_model(self.model, cfg.model.name_or_path)
        self.eos_ids = default_eos_ids(self.model, self.tok)
        self.sampling_defaults = model_sampling_defaults(self.model)
        max_context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self.limits = PromptLimits(cfg, self.tok, max_context)
        self.torch_threads = torch.get_num_threads()
        self.registry = RunRegistry(
            self.store,
            cfg.run,
            self.fingerprint,
            self.num_layers,
            cfg.fallback_group,
            group_cache_size=cfg.edit_cache_size,
        )
        self.edits = EditLoader(cfg, self.registry, hidden_size(self.model), self.device, metrics)
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.engine = Engine(
            self.model,
            self.tok,
            self.eos_ids,
            max_running=cfg.max_batch_size,
            max_prefill_tokens=cfg.max_prefill_tokens,
            stream_interval_s=cfg.stream_interval_s,
            metrics=metrics,
        )
        self.registry.refresh()

    # -- background refresh ------------------------------------------------------------------

    def start_polling(self) -> None:
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="chameleon-run-refresh", daemon=True)
            self._poller.start()

    def stop_polling(self) -> None:
        self._stop.set()
        self.engine.stop()

    def _poll(self) -> None:
        while not self._stop.wait(self.cfg.refresh_interval_s):
            if self.registry.on_pinned_run():
                continue  # a pinned run that is being served never changes
            try:  # `latest`, or a pinned run not loaded yet: retried until it is served
                self.registry.refresh()
            except Exception:  # never let the poller die
                log.exception("run refresh failed")

    def switch_run(self, run: str) -> None:
        """Serve `run` (an id, or `latest` to follow the pointer) from now on. Tried at once; when
        it cannot be loaded yet (not published, a store error) the current run keeps serving and
        the poller retries every `refresh_interval_s` until it is served (or refused for good)."""
        self.cfg.run = run
        self.registry.requested = run
        self.registry.refresh()
        status = self.registry.status()
        if not status["on_target"]:
            log.error(
                "asked to serve run %r; still serving %r: %s", run, status["run_id"], status["problems"]
            )
        else:
            log.info("now serving run %s (requested %r)", status["run_id"], run)

    # -- one request ------------------------------------------------------------------------------

    async def admit(self, request: GenerationRequest) -> Admission:
        """Tokenize within the limits, resolve the sampling, the run and the group, and pin the
        group's bank row (loading its edit)."""
        self.limits.check_chars(request)
        prompt_ids = await asyncio.to_thread(self.limits.token_ids, request)  # keeps the event loop free
        params = self.limits.resolve_sampling(request.params, len(prompt_ids), self.sampling_defaults)
        res = self.edits.resolve(request)
        edit = await self.edits.pin(res.run, res.group_id, res.markers) if res.group_id is not None else None
        item = GenItem(prompt_ids, params, edit.row if edit is not None else 0)
        return Admission(item, res, edit, stream=request.stream, admitted_at=time.perf_counter())

    def system_fingerprint(self, res: Resolution) -> str:
        """What produced an answer: the run in effect (`base` when the request turned
        personalization off or no run is served) and the model's fingerprint. It never depends on
        whether the request's `user` is in the run (that would tell any key holder who is)."""
        run = res.run.run_id if res.run is not None and res.source != "off" else "base"
        return f"{run}@{self.fingerprint.weights_sha256[:16]}"

    async def events(
        self, request: GenerationRequest, request_id: Callable[[], str] = lambda: ""
    ) -> AsyncIterator[ReplicaEvent]:
        """One request, as events for the ingress: `Started` (or `Failed`), then `Generated`
        (each stream step; one with the whole text otherwise), then `Finished` (or `Failed`).
        Errors are events, never exceptions: a request's own bad settings (`SamplingError`) are
        its 400, a dead engine is 503, anything else 500."""
        try:
            adm = await self.admit(request)
        except ApiError as exc:
            yield Failed.of(exc)
            return
        except Exception as exc:
            log.exception("admission failed")
            yield Failed.of(
                ApiError(500, f"internal error during admission: {type(exc).__name__}", "internal_error")
            )
            return
        texts: list[str] = []
        ids: list[int] = []
        n, finish, stop_reason, first_at = 0, None, None, None
        try:  # from here on the pinned row is released on every exit path (finally)
            yield Started(
                personalization=adm.resolution.describe(),
                prompt_tokens=len(adm.item.prompt_ids),
                max_tokens=adm.item.params.max_tokens,
                system_fingerprint=self.system_fingerprint(adm.resolution),
            )
            async for chunk in self.stream(adm):
                first_at = first_at or time.perf_counter()
                text = "".join(d.text for d in chunk)
                chunk_ids = [t for d in chunk for t in d.token_ids]
                n += len(chunk_ids)
                if chunk[-1].finish_reason:
                    finish, stop_reason = chunk[-1].finish_reason, chunk[-1].stop_reason
                if adm.stream:
                    if text or request.return_token_ids:
                        yield Generated(text, tuple(chunk_ids))
                else:
                    texts.append(text)
                    ids += chunk_ids
                if finish is not None:
                    if not adm.stream:
                        yield Generated("".join(texts), tuple(ids))
                    yield Finished(finish, stop_reason, n)
            if finish is None:
                raise RuntimeError("the engine ended before this request finished")
        except SamplingError as exc:  # this request's sampling settings: it alone fails
            finish = "error"
            yield Failed.of(ApiError(400, str(exc), "invalid_sampling"))
        except EngineDeadError:
            finish = "error"
            yield Failed.of(
                ApiError(
                    503,
                    "the model replica's decode engine failed; retry (it is being replaced)",
                    "engine_unavailable",
                )
            )
        except Exception as exc:
            log.exception("generation failed")
            finish = "error"
            yield Failed.of(
                ApiError(
                    500, f"internal error during generation: {type(exc).__name__}: {exc}", "internal_error"
                )
            )
        finally:
            adm.release()  # the row has left (or is leaving) the batch
            self._log_request(adm, n, finish or "cancelled", first_at, request_id)

    def _log_request(
        self,
        adm: Admission,
        completion_tokens: int,
        finish: str,
        first_at: float | None,
        request_id: Callable[[], str],
    ) -> None:
        latency = time.perf_counter() - adm.admitted_at
        self.metrics.request_done(len(adm.item.prompt_ids), latency, finish)
        if self.cfg.log_requests:
            record = adm.log_record(request_id(), completion_tokens, finish, first_at, latency)
            log.info(json.dumps(record))

    async def stream(self, adm: Admission) -> AsyncIterator[list[Delta]]:
        """The request's deltas from the engine, gathered per `stream_interval_s`. Leaving early
        aborts its row; the caller releases the pinned bank row."""
        async with contextlib.aclosing(self.engine.stream(adm.item, adm.bank)) as chunks:
            async for chunk in chunks:
                yield chunk

    def check_health(self) -> None:
        """Serve's probe: raises when the engine's decode loop is dead or stalled with work
        waiting (`EngineDeadError`), then runs a tiny operation on the model's device (it hangs,
        and the caller's timeout fires, when the device is wedged)."""
        self.engine.check(self.cfg.engine_stall_timeout_s)
        torch.zeros(1, device=self.device).add_(1).item()

    def status(self) -> str:
        """`ok`, `degraded` or `unavailable`: all that unauthenticated callers learn."""
        if not self.engine.state()["alive"]:
            return "unavailable"
        return self.registry.status()["status"]

    def health(self) -> dict[str, Any]:
        """Details for operators (behind the key): runs, problems, caches, batching."""
        status = self.registry.status()
        batching: dict[str, Any] = {
            "max_batch_size": self.cfg.max_batch_size,
            "stream_interval_s": self.cfg.stream_interval_s,
            **self.engine.stats,
            **self.engine.counts(),
        }
        engine = self.engine.state()
        if not engine["alive"]:
            status["status"] = "unavailable"
            status["problems"].append(f"the decode engine is dead: {engine['dead_reason']}")
        status.update(
            {
                "model": self.cfg.model_name,
                "model_fingerprint": self.fingerprint.to_dict(),
                "device": str(self.device),
                "torch_threads": self.torch_threads,
                **self.edits.status(),
                "batching": batching,
                "engine": engine,
            }
        )
        return status
