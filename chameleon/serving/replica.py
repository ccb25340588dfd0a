"""The model replica's core, without Ray: model, tokenizer, runs, edit caches, admission, engines.

`ModelServer` is what a `ChameleonServer` replica (chameleon.serving.app) holds. A request is
*admitted* once (`admit`): its prompt is tokenized within the limits, its run and group are
resolved against the run being served at that moment, and its bank row is pinned in the
`EditCache` of that run's bank layout, so a switch of `latest` never mixes runs inside one request
and never evicts a row a batch still reads. Then `stream` hands it to the replica's `Engine`
(chameleon.serving.engine), which joins it to the running batch at the next step and retires it
as soon as it ends: greedy and sampled requests of many groups share every forward pass. The
caller releases the pinned row (`Admission.release`, idempotent) on every exit path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from chameleon.core.edit import Edit, EditBank
from chameleon.core.fingerprint import fingerprint_model
from chameleon.core.model import hidden_size, model_device, num_layers
from chameleon.data.capabilities import check_store
from chameleon.data.model_mirror import load_model_for
from chameleon.data.storage import Store, StoreError, open_store
from chameleon.serving.config import ServeConfig
from chameleon.serving.decoder import Delta, GenItem, SamplingError, default_eos_ids
from chameleon.serving.edit_cache import CacheFullError, EditCache
from chameleon.serving.engine import Engine, EngineDeadError
from chameleon.serving.metrics import NULL_METRICS, ServingMetrics
from chameleon.serving.protocol import ApiError
from chameleon.serving.registry import BankSpec, LoadedRun, RunRegistry

log = logging.getLogger("chameleon.serving")


@dataclass
class Resolution:
    run: LoadedRun | None
    group_id: str | None
    source: str
    """`user` (assignment), `group` (named in the request), `fallback`, or `off`."""
    user: str | None

    def describe(self) -> dict[str, Any]:
        return {
            "run_id": self.run.run_id if self.run else None,
            "group_id": self.group_id,
            "source": self.source,
            "user": self.user,
        }


@dataclass
class Admission:
    """A request that passed admission: prompt tokens, resolved edit, pinned bank row."""

    item: GenItem
    resolution: Resolution
    spec: BankSpec | None
    cache: EditCache | None
    stream: bool
    admitted_at: float = 0.0
    """`time.perf_counter()` when admission finished."""
    released: bool = False

    def log_record(
        self, request_id: str, completion_tokens: int, finish: str, first_at: float | None, latency: float
    ) -> dict[str, Any]:
        """The request's structured log line (one per finished request)."""
        res = self.resolution
        return {
            "event": "request",
            "request_id": request_id,
            "run_id": res.run.run_id if res.run else None,
            "group_id": res.group_id,
            "source": res.source,
            "prompt_tokens": len(self.item.prompt_ids),
            "completion_tokens": completion_tokens,
            "finish_reason": finish,
            "ttft_s": round(first_at - self.admitted_at, 4) if first_at else None,
            "latency_s": round(latency, 4),
        }

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self.cache is not None and self.item.row:
                self.cache.release(self.item.row)


def _edit_unusable() -> ApiError:
    return ApiError(503, "the personalization edit for this request cannot be used", "artifact_error")


class ModelServer:
    """Model, tokenizer, runs, edit caches and the engine of one replica (no Ray)."""

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
        self.hidden_size = hidden_size(self.model)
        self.num_layers = num_layers(self.model)
        self.fingerprint = fingerprint_model(self.model, cfg.model.name_or_path)
        self.eos_ids = default_eos_ids(self.model, self.tok)
        self.sampling_defaults = sampling_defaults(self.model)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self.torch_threads = torch.get_num_threads()
        self.registry = RunRegistry(
            self.store,
            cfg.run,
            self.fingerprint,
            self.num_layers,
            cfg.fallback_group,
            group_cache_size=cfg.edit_cache_size,
        )
        self._caches: dict[BankSpec, EditCache] = {}
        self._loading: dict[tuple[str, str], asyncio.Future] = {}
        # Edit loads get their own threads: a hanging store ties these up, never the default
        # executor that runs every decode step (and tokenization).
        self._load_pool = ThreadPoolExecutor(cfg.edit_load_workers, thread_name_prefix="chameleon-edit-load")
        self._failed: dict[tuple[str, str], tuple[float, ApiError]] = {}  # key -> (until, answer)
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

    # -- admission -----------------------------------------------------------------------------

    def check_prompt_chars(self, payload: dict[str, Any]) -> None:
        """Refuse prompts too long to be worth tokenizing (cheap, on the event loop)."""
        if payload["kind"] == "chat":
            n = sum(len(m.get("content") or "") + len(m.get("role") or "") for m in payload["messages"])
        else:
            n = len(payload["prompt"])
        limit = self.cfg.prompt_char_limit
        if n > limit:
            raise ApiError(
                400,
                f"the prompt has {n} characters; this server accepts at most {limit}",
                "context_length_exceeded",
                param="messages" if payload["kind"] == "chat" else "prompt",
            )

    def render(self, payload: dict[str, Any]) -> list[int]:
        """Prompt token ids of a request, within the limits (ApiError 400 otherwise)."""
        if payload["kind"] == "chat":
            messages = payload["messages"]
            if getattr(self.tok, "chat_template", None):
                try:
                    # Only the allow-listed, value-checked kwargs (protocol.TEMPLATE_KWARGS) get here.
                    kwargs = {"add_generation_prompt": True, **(payload.get("chat_template_kwargs") or {})}
                    text = self.tok.apply_chat_template(messages, tokenize=False, **kwargs)
                except Exception as exc:  # jinja raises for conversations the template rejects
                    raise ApiError(
                        400,
                        f"the model's chat template rejects these messages: {str(exc)[:200]}",
                        "invalid_messages",
                        param="messages",
                    ) from None
            else:
                text = "".join(f"{m['content']}\n" for m in messages)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tok(payload["prompt"], add_special_tokens=True)["input_ids"]
        n = len(ids)
        if n == 0:
            raise ApiError(400, "the prompt is empty", "invalid_value", param="prompt")
        if n > self.cfg.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt has {n} tokens; this server accepts at most {self.cfg.max_prompt_tokens}",
                "context_length_exceeded",
                param="messages" if payload["kind"] == "chat" else "prompt",
            )
        return list(ids)

    def max_tokens_for(self, payload: dict[str, Any], n_prompt: int) -> int:
        asked = payload.get("max_tokens")
        room = (self.max_context - n_prompt) if self.max_context else None
        if room is not None and room < 1:
            raise ApiError(
                400,
                f"the prompt ({n_prompt} tokens) fills the model's context of {self.max_context}",
                "context_length_exceeded",
            )
        if asked is None:
            return max(1, min(self.cfg.default_max_tokens, room or self.cfg.default_max_tokens))
        if room is not None and asked > room:
            raise ApiError(
                400,
                f"prompt ({n_prompt} tokens) + max_tokens ({asked}) exceeds the model's context of "
                f"{self.max_context} tokens",
                "context_length_exceeded",
                param="max_tokens",
            )
        return int(asked)

    def resolve(self, payload: dict[str, Any]) -> Resolution:
        """Which run and group a request gets (decided once, at admission)."""
        pers = payload.get("personalization") or {}
        user = payload.get("user")
        run = self.registry.current
        if pers.get("off"):
            return Resolution(run, None, "off", user)
        if run is None:  # why (store errors, refused runs) is on the authenticated status endpoint
            raise ApiError(
                503,
                "no personalization run is being served yet; "
                "send personalization.off=true for the base model",
                "no_run",
            )
        gid = pers.get("group_id")
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
            return Resolution(run, run.user_groups[user], "user", user)
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

    def load_edit(self, run: LoadedRun, group_id: str) -> Edit:
        return run.published.group_edit(group_id)

    async def admit(self, payload: dict[str, Any]) -> Admission:
        """Tokenize, resolve the run and group, and pin the group's bank row (loading its edit)."""
        self.check_prompt_chars(payload)
        prompt_ids = await asyncio.to_thread(self.render, payload)  # keeps the event loop free
        max_tokens = self.max_tokens_for(payload, len(prompt_ids))
        res = self.resolve(payload)
        row, cache, spec = 0, None, None
        if res.group_id is not None:
            spec = res.run.spec
            cache = self.cache_for(spec)
            row = await self._acquire(cache, res.run, res.group_id)
            self.metrics.edit_cache(id(cache), *_cache_counts(cache))
        sampling = {**self.sampling_defaults, **{k: v for k, v in payload.items() if v is not None}}
        item = GenItem(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=float(sampling.get("temperature", 1.0)),
            top_p=float(sampling.get("top_p", 1.0)),
            top_k=max(0, int(sampling.get("top_k", 0))),
            min_p=float(sampling.get("min_p", 0.0)),
            repetition_penalty=float(sampling.get("repetition_penalty", 1.0)),
            frequency_penalty=float(sampling.get("frequency_penalty", 0.0)),
            presence_penalty=float(sampling.get("presence_penalty", 0.0)),
            seed=payload.get("seed"),
            stop=tuple(payload.get("stop") or ()),
            stop_token_ids=tuple(payload.get("stop_token_ids") or ()),
            min_tokens=min(int(payload.get("min_tokens") or 0), max_tokens),
            row=row,
            ignore_eos=bool(payload.get("ignore_eos")),
        )
        return Admission(
            item, res, spec, cache, stream=bool(payload.get("stream")), admitted_at=time.perf_counter()
        )

    def system_fingerprint(self, res: Resolution) -> str:
        """What produced an answer: the run in effect (`base` when the request turned
        personalization off or no run is served) and the model's fingerprint. It never depends on
        whether the request's `user` is in the run (that would tell any key holder who is)."""
        run = res.run.run_id if res.run is not None and res.source != "off" else "base"
        return f"{run}@{self.fingerprint.weights_sha256[:16]}"

    async def events(
        self, payload: dict[str, Any], request_id: Callable[[], str] = lambda: ""
    ) -> AsyncIterator[dict[str, Any]]:
        """One request, as events for the ingress: `start` (or `error`), then `delta`s, then
        `end` (or `error`). Errors are events, never exceptions: a request's own bad settings
        (`SamplingError`) are its 400, a dead engine is 503, anything else 500."""
        try:
            adm = await self.admit(payload)
        except ApiError as exc:
            yield exc.to_event()
            return
        except Exception as exc:
            log.exception("admission failed")
            yield ApiError(
                500, f"internal error during admission: {type(exc).__name__}", "internal_error"
            ).to_event()
            return
        texts: list[str] = []
        ids: list[int] = []
        n, finish, stop_reason, first_at = 0, None, None, None
        want_ids = bool(payload.get("return_token_ids"))
        try:  # from here on the pinned row is released on every exit path (finally)
            yield {
                "type": "start",
                "personalization": adm.resolution.describe(),
                "prompt_tokens": len(adm.item.prompt_ids),
                "max_tokens": adm.item.max_tokens,
                "system_fingerprint": self.system_fingerprint(adm.resolution),
            }
            async for chunk in self.stream(adm):
                first_at = first_at or time.perf_counter()
                text = "".join(d.text for d in chunk)
                chunk_ids = [t for d in chunk for t in d.token_ids]
                n += len(chunk_ids)
                if chunk[-1].finish_reason:
                    finish, stop_reason = chunk[-1].finish_reason, chunk[-1].stop_reason
                if adm.stream:
                    if text or want_ids:
                        yield {"type": "delta", "text": text, "token_ids": chunk_ids}
                else:
                    texts.append(text)
                    ids += chunk_ids
                if finish is not None:
                    if not adm.stream:
                        yield {"type": "delta", "text": "".join(texts), "token_ids": ids}
                    yield {
                        "type": "end",
                        "finish_reason": finish,
                        "stop_reason": stop_reason,
                        "completion_tokens": n,
                    }
            if finish is None:
                raise RuntimeError("the engine ended before this request finished")
        except SamplingError as exc:  # this request's sampling settings: it alone fails
            finish = "error"
            yield ApiError(400, str(exc), "invalid_sampling").to_event()
        except EngineDeadError:
            finish = "error"
            yield ApiError(
                503,
                "the model replica's decode engine failed; retry (it is being replaced)",
                "engine_unavailable",
            ).to_event()
        except Exception as exc:
            log.exception("generation failed")
            finish = "error"
            yield ApiError(
                500, f"internal error during generation: {type(exc).__name__}: {exc}", "internal_error"
            ).to_event()
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
        bank = adm.cache.bank if adm.cache is not None and adm.item.row else None
        async with contextlib.aclosing(self.engine.stream(adm.item, bank)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _acquire(self, cache: EditCache, run: LoadedRun, group_id: str) -> int:
        """Pin the group's row, loading its edit on a miss. One deadline, `admission_timeout_s`,
        covers the load and the wait for a free row (FIFO); past it: 503 with Retry-After."""
        key = (run.run_id, group_id)
        deadline = time.monotonic() + self.cfg.admission_timeout_s

        async def load() -> Edit:
            return await self._load(run, group_id, deadline)

        try:
            # One FIFO line for hits and misses; the edit loads (only if needed) while in line.
            return await cache.pin(key, load, run.edit, self.cfg.admission_timeout_s)
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

    def _remember_failure(self, key: tuple[str, str], err: ApiError) -> ApiError:
        """Answer `err` from memory for `edit_failure_ttl_s` (no download per request)."""
        if self.cfg.edit_failure_ttl_s > 0:
            self._failed[key] = (time.monotonic() + self.cfg.edit_failure_ttl_s, err)
        return err

    def _load_done(self, key: tuple[str, str], fut: asyncio.Future) -> None:
        self._loading.pop(key, None)
        if not fut.cancelled():
            fut.exception()  # retrieved: a load every waiter gave up on is not an unhandled error

    async def _load(self, run: LoadedRun, group_id: str, deadline: float) -> Edit:
        """The group's edit, read once however many requests wait for it, on the load pool, by
        `deadline` (time.monotonic). Client messages carry no store detail; it is logged and kept
        for the status endpoint."""
        key = (run.run_id, group_id)
        failed = self._failed.get(key)
        if failed is not None:
            if failed[0] > time.monotonic():
                raise failed[1]
            del self._failed[key]
        fut = self._loading.get(key)
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(self._load_pool, self.load_edit, run, group_id)
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
                "batching": batching,
                "engine": engine,
            }
        )
        return status


SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(model) -> dict[str, Any]:
    """Sampling settings the model's generation config sets explicitly (as vLLM and Ray Serve LLM
    use them): they apply where a request gives none."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return {}
    try:
        explicit = gen.to_diff_dict()
    except Exception:  # an odd config: no defaults rather than no server
        return {}
    return {k: explicit[k] for k in SAMPLING_DEFAULT_KEYS if explicit.get(k) is not None}


def _cache_counts(cache: EditCache) -> tuple[int, int, int]:
    st = cache.stats()
    return st.hits, st.misses, st.evictions
