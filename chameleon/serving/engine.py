"""Continuous batching: one decode loop per model replica, a different edit per row.

No Ray and no web framework (torch alone). `Engine` owns a running batch with a KV cache and a
dedicated thread that, at every step:

1. drops rows whose client went away (`abort`),
2. admits waiting requests up to `max_running` rows and `max_prefill_tokens` padded prompt tokens
   (a longer prompt is prefilled alone): they are prefilled together in one forward (left
   padded, each with its own edit) and their first token is emitted at once; the rest wait for
   the next step, so a burst of long prompts never stalls or swamps the running streams,
3. merges them into the running batch: the KV tensors of both are left padded to a common length
   and concatenated along the batch; an attention mask hides the padding and explicit position
   ids keep each row's own positions, so a row's tokens do not depend on who shares its batch,
4. runs one decode forward for every running row (each row's `EditBank` row applied in one
   batched operation: the per-row bank indices follow the rows as they join and leave),
5. retires finished rows at once (their cache rows are dropped, and padding columns nobody
   needs any more are trimmed). A row whose logits cannot be sampled (`SamplingError`) is
   retired alone with that error; the others go on.

Requests of one bank layout share the batch; a request for another layout (a switch to a run
with other edited layers) waits until no edited row of the previous layout runs (a "run switch"):
meanwhile no more rows of the old layout are admitted, and rows without an edit (bank row 0),
which run with any layout, never wait for the switch.

Health: `check` raises `EngineDeadError` when the loop has died (every waiting and running
request was failed with it at once, and new ones are refused) or when requests wait and no step
has finished for `stall_s`; the replica's health check calls it, so Serve replaces the replica.

`stream()` is the asyncio side: it submits a request and yields lists of `Delta`s, the first
token at once and later ones gathered over `stream_interval_s`, so a stream crosses the actor
boundary a few times per second instead of once per token.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from chameleon.core.edit import BoundEdits, EditBank
from chameleon.core.model import model_device
from chameleon.serving.decoder import (
    Delta,
    GenItem,
    SamplingError,
    SeqState,
    forward_kwargs,
    left_pad,
    pad_id,
    pick_tokens,
    run_forward,
)
from chameleon.serving.metrics import NULL_METRICS, ServingMetrics

log = logging.getLogger("chameleon.serving")


class EngineError(RuntimeError):
    """The decode loop failed for the requests it was running (the loop itself goes on)."""


class EngineDeadError(EngineError):
    """The decode loop is gone or stalled: the replica cannot decode and must be replaced."""


@dataclass(eq=False)
class Request:
    """One submitted sequence: its decoding state, its edit, and where its deltas go."""

    seq: SeqState
    bank: EditBank | None
    sink: Callable[[list[Delta | BaseException]], None]
    """Called on the engine thread with this request's new deltas (or an exception)."""
    submitted: float = field(default_factory=time.perf_counter)
    last_token: float | None = None
    aborted: bool = False

    @property
    def row(self) -> int:
        return self.seq.item.row if self.bank is not None else 0


class Engine:
    """The continuous-batching decode loop of one replica (see the module docstring)."""

    def __init__(
        self,
        model,
        tok,
        eos_token_ids: Sequence[int],
        *,
        max_running: int = 32,
        max_prefill_tokens: int = 8192,
        stream_interval_s: float = 0.02,
        metrics: ServingMetrics = NULL_METRICS,
    ) -> None:
        self.model, self.tok = model, tok
        self.device = model_device(model)
        self.eos = list(eos_token_ids)
        self.pad = pad_id(tok, self.eos)
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.stream_interval_s = stream_interval_s
        self.metrics = metrics
        self._cache_kw, self._keep_logits = forward_kwargs(model)
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._dead: str | None = None  # why the loop died (then every request is refused)
        self._beat = time.monotonic()  # when the loop last started or finished a step
        self._stepping = False  # a step is running (its new rows are neither waiting nor running)
        # The running batch (engine thread only): rows, KV cache, mask [B, L], last positions
        # [B], the tokens to feed next [B], the bank of its edited rows and their bound edits.
        self._running: list[Request] = []
        self._cache: Any = None
        self._mask = self._pos = self._next = None
        self._bank: EditBank | None = None
        self._bound: BoundEdits | None = None
        self._bound_valid = False
        self.stats = {
            "steps": 0,
            "prefills": 0,
            "max_batch": 0,
            "max_groups_in_batch": 0,
            "generated_tokens": 0,
            "run_switches": 0,
            "finished": 0,
            "aborted": 0,
            "failed": 0,
            "max_prefill_tokens_seen": 0,
        }

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="chameleon-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- submission (any thread) -----------------------------------------------------------------

    def submit(
        self, item: GenItem, bank: EditBank | None, sink: Callable[[list[Delta | BaseException]], None]
    ) -> Request:
        req = Request(SeqState.new(item, self.tok, self.eos, self.device), bank, sink)
        with self._cv:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            if self._stopping:
                raise EngineError("the engine is stopped")
            if not self._waiting and not self._running:
                self._beat = time.monotonic()  # an idle loop: the stall clock starts now
            self._waiting.append(req)
            self._cv.notify_all()
        self.start()
        return req

    def abort(self, req: Request) -> None:
        """The client went away: the row leaves the batch at the next step (or never joins)."""
        with self._cv:
            req.aborted = True
            self._cv.notify_all()

    def counts(self) -> dict[str, int]:
        with self._cv:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    def check(self, stall_s: float) -> None:
        """Raise `EngineDeadError` when the loop died, or when requests wait or run and no step
        started or finished for `stall_s` seconds (a wedged device or thread)."""
        with self._cv:
            dead, beat = self._dead, self._beat
            busy = bool(self._waiting or self._running or self._stepping)
            thread, stopping = self._thread, self._stopping
        if dead is not None:
            raise EngineDeadError(dead)
        if thread is not None and not thread.is_alive() and not stopping:
            raise EngineDeadError("the decode thread is gone")
        idle_for = time.monotonic() - beat
        if busy and idle_for > stall_s:
            raise EngineDeadError(
                f"no decode step for {idle_for:.0f} s while requests wait (limit {stall_s:g} s)"
            )

    def state(self) -> dict[str, Any]:
        """The loop's liveness for the status endpoint."""
        with self._cv:
            return {
                "alive": self._dead is None
                and (self._thread is None or self._thread.is_alive() or self._stopping),
                "dead_reason": self._dead,
                "seconds_since_step": round(time.monotonic() - self._beat, 3),
            }

    async def stream(
        self, item: GenItem, bank: EditBank | None, interval_s: float | None = None
    ) -> AsyncIterator[list[Delta]]:
        """Generate one sequence: lists of deltas, the first token alone and at once, then one list
        per interval; the last delta of the last list carries the finish reason. Leaving early
        aborts the row."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

        def deliver(items: list[Delta | BaseException]) -> None:
            for x in items:
                queue.put_nowait(x)

        def sink(items: list[Delta | BaseException]) -> None:
            loop.call_soon_threadsafe(deliver, items)

        interval = self.stream_interval_s if interval_s is None else interval_s
        req = self.submit(item, bank, sink)
        done, first = False, True
        try:
            while not done:
                got = [await queue.get()]
                if not first:  # the first token goes out alone, at once; later ones are gathered
                    if interval > 0 and not _ends(got[-1]):
                        await asyncio.sleep(interval)  # gather what the next steps produce
                    while not _ends(got[-1]) and not queue.empty():
                        got.append(queue.get_nowait())
                first = False
                if isinstance(got[-1], BaseException):
                    raise got[-1]
                done = got[-1].finish_reason is not None
                yield got  # type: ignore[misc]
        finally:
            if not done:
                self.abort(req)

    # -- the loop (engine thread) ----------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # the loop itself broke (not one step): the engine is dead
            log.exception("the decode loop died")
            self._die(f"the decode loop died ({type(exc).__name__})")

    def _die(self, reason: str) -> None:
        """Fail every running and waiting request at once (503 for them, not a timeout minutes
        later) and refuse new ones; `check` reports it, so the replica is replaced."""
        with self._cv:
            self._dead = reason
            pending = [*self._running, *self._waiting]
            self._waiting.clear()
        err = EngineDeadError(reason)
        for r in pending:
            _tell(r, err)
        self._reset()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._running:
                    self._beat = time.monotonic()
                    self._cv.wait()
                if self._stopping:
                    break
                self._beat = time.monotonic()
                new = self._take()
                waiting = len(self._waiting)
                self._stepping = True
            try:
                with torch.inference_mode():
                    self._drop_aborted()
                    if new:
                        self._prefill(new)
                    if self._running:
                        self._decode()
                self.metrics.engine_step(len(self._running), waiting)
            except Exception as exc:  # fail the requests involved, keep the loop alive
                log.exception("decode step failed")
                err = EngineError(f"decode step failed: {type(exc).__name__}: {exc}")
                for r in {*self._running, *new}:
                    _tell(r, err)
                self._reset()
            finally:
                self._beat, self._stepping = time.monotonic(), False
        for r in [*self._running, *self._waiting]:
            _tell(r, EngineError("the engine stopped"))

    def _take(self) -> list[Request]:
        """Waiting requests to admit now (under the lock): FIFO within the free rows and the
        prefill token budget (rows × longest prompt; a longer prompt goes alone). While a request
        for another bank layout waits for the old layout's rows to finish, no more edited rows
        are admitted (the old layout drains) but base rows are."""
        taken: list[Request] = []
        room = self.max_running - len(self._running)
        longest = 0
        edited_running = any(x.row for x in self._running)
        switch_pending = False
        for r in self._waiting:
            if len(taken) >= room:
                break
            if r.aborted:
                continue
            n = len(r.seq.item.prompt_ids)
            if taken and (len(taken) + 1) * max(longest, n) > self.max_prefill_tokens:
                break  # the rest joins at the next step, after one more decode of the running rows
            if r.row:
                if switch_pending:
                    continue
                if r.bank is not self._bank:
                    if edited_running or any(x.row for x in taken):
                        switch_pending = True  # wait for the old layout's rows to finish
                        continue
                    self._bank, self._bound_valid = r.bank, False
                    self.stats["run_switches"] += 1
                    self.metrics.run_switch()
            taken.append(r)
            longest = max(longest, n)
        if taken or any(r.aborted for r in self._waiting):
            chosen = set(map(id, taken))
            self.stats["aborted"] += sum(1 for r in self._waiting if r.aborted and id(r) not in chosen)
            self._waiting = collections.deque(
                r for r in self._waiting if id(r) not in chosen and not r.aborted
            )
        if taken:
            padded = len(taken) * longest
            self.stats["max_prefill_tokens_seen"] = max(self.stats["max_prefill_tokens_seen"], padded)
        return taken

    def _bind(self, reqs: Sequence[Request]) -> BoundEdits | None:
        rows = [r.row for r in reqs]
        return self._bank.bind(rows) if self._bank is not None and any(rows) else None

    def _prefill(self, new: list[Request]) -> None:
        now = time.perf_counter()
        for r in new:
            self.metrics.queue_wait(now - r.submitted)
        ids, mask, pos = left_pad([r.seq.item.prompt_ids for r in new], self.pad, self.device)
        logits, cache = run_forward(
            self.model,
            ids,
            pos,
            None if bool(mask.all()) else mask,
            None,
            self._bind(new),
            self._cache_kw,
            self._keep_logits,
        )
        self.stats["prefills"] += 1
        tokens, failed = pick_tokens(logits, [r.seq for r in new])
        self._emit(new, tokens.tolist(), failed, first=True)
        keep = [j for j, r in enumerate(new) if r.seq.finish is None]
        if not keep:
            return
        if len(keep) < len(new):
            idx = torch.tensor(keep, device=self.device)
            _select_rows(cache, idx)
            mask, pos, tokens = mask[idx], pos[idx], tokens[idx]
        joined = [new[j] for j in keep]
        if not self._running:
            self._cache, self._mask = cache, mask
            self._pos, self._next = pos[:, -1], tokens
        else:
            self._cache, self._mask = _merge(self._cache, self._mask, cache, mask)
            self._pos = torch.cat([self._pos, pos[:, -1]])
            self._next = torch.cat([self._next, tokens])
        self._running += joined
        self._bound_valid = False
        self.stats["max_batch"] = max(self.stats["max_batch"], len(self._running))

    def _decode(self) -> None:
        B = len(self._running)
        mask = torch.cat([self._mask, self._mask.new_ones((B, 1))], dim=1)
        pos = self._pos + 1
        if not self._bound_valid:  # the composition changed: gather the rows' edits once
            self._bound, self._bound_valid = self._bind(self._running), True
            groups = len({r.row for r in self._running if r.row})
            self.stats["max_groups_in_batch"] = max(self.stats["max_groups_in_batch"], groups)
        logits, self._cache = run_forward(
            self.model,
            self._next[:, None],
            pos[:, None],
            None if bool(mask.all()) else mask,
            self._cache,
            self._bound,
            self._cache_kw,
            self._keep_logits,
        )
        self._mask, self._pos = mask, pos
        self.stats["steps"] += 1
        self.metrics.batch_size(B)
        self._next, failed = pick_tokens(logits, [r.seq for r in self._running])
        self._emit(self._running, self._next.tolist(), failed, first=False)
        self._retire([j for j, r in enumerate(self._running) if r.seq.finish is None])

    def _emit(self, reqs: Sequence[Request], tokens: list[int], failed: dict[int, str], first: bool) -> None:
        now = time.perf_counter()
        for j, (r, t) in enumerate(zip(reqs, tokens, strict=True)):
            if r.aborted:
                self._cancel(r)
                continue
            if j in failed:  # this row alone: it leaves the batch with its error
                r.seq.finish = "error"
                self.stats["failed"] += 1
                _tell(r, SamplingError(failed[j]))
                continue
            delta = r.seq.append(t)
            if first:
                self.metrics.ttft(now - r.submitted)
            elif r.last_token is not None:
                self.metrics.inter_token(now - r.last_token)
            r.last_token = now
            if delta.finish_reason:
                self.stats["finished"] += 1
            try:
                r.sink([delta])
            except Exception:  # its consumer is gone (e.g. a closed event loop): drop this row only
                log.warning("dropping a request whose consumer is gone", exc_info=True)
                r.aborted = True
                self._cancel(r)
        self.stats["generated_tokens"] += len(tokens)
        self.metrics.generated_tokens(len(tokens))

    def _drop_aborted(self) -> None:
        if any(r.aborted for r in self._running):
            for r in self._running:
                if r.aborted:
                    self._cancel(r)
            self._retire([j for j, r in enumerate(self._running) if r.seq.finish is None])

    def _cancel(self, r: Request) -> None:
        if r.seq.finish is None:
            r.seq.finish = "cancelled"
            self.stats["aborted"] += 1

    def _retire(self, keep: list[int]) -> None:
        """Keep only rows `keep` of the running batch; trim padding no remaining row needs."""
        if len(keep) == len(self._running):
            return
        self._bound_valid = False
        if not keep:
            self._reset()
            return
        idx = torch.tensor(keep, device=self.device)
        _select_rows(self._cache, idx)
        self._running = [self._running[j] for j in keep]
        self._mask, self._pos, self._next = self._mask[idx], self._pos[idx], self._next[idx]
        used = self._mask.any(0)
        start = int(torch.argmax(used.to(torch.int8)))  # first column some row attends to
        if start > 0:
            self._mask = self._mask[:, start:]
            for layer in _layers(self._cache):
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def _reset(self) -> None:
        self._running = []
        self._cache = self._mask = self._pos = self._next = None
        self._bound, self._bound_valid = None, False


def _tell(r: Request, err: BaseException) -> None:
    try:
        r.sink([err])
    except Exception:  # its consumer is gone already
        log.debug("request consumer gone", exc_info=True)


def _ends(x: Delta | BaseException) -> bool:
    return isinstance(x, BaseException) or x.finish_reason is not None


def _layers(cache) -> list[Any]:
    """The cache's layers as [B, heads, L, dim] key/value tensors (transformers' DynamicCache);
    other caches (sliding windows, static, quantized) cannot be merged row by row."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(x, "keys") or getattr(x, "is_sliding", False) for x in layers):
        raise EngineError(
            f"continuous batching needs a full dynamic KV cache, got {type(cache).__name__}; "
            "this model cannot be served by the continuous-batching engine"
        )
    return list(layers)


def _select_rows(cache, idx: torch.Tensor) -> None:
    for layer in _layers(cache):
        layer.keys, layer.values = layer.keys[idx], layer.values[idx]


def _merge(cache_a, mask_a: torch.Tensor, cache_b, mask_b: torch.Tensor):
    """Append batch b to batch a: both left padded to a common length, then concatenated."""
    la, lb = mask_a.shape[1], mask_b.shape[1]
    L = max(la, lb)

    def pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
        if n == 0:
            return t
        shape = list(t.shape)
        shape[dim] = n
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    for a, b in zip(_layers(cache_a), _layers(cache_b), strict=True):
        a.keys = torch.cat([pad(a.keys, L - la, 2), pad(b.keys, L - lb, 2)])
        a.values = torch.cat([pad(a.values, L - la, 2), pad(b.values, L - lb, 2)])
    mask = torch.cat([pad(mask_a, L - la, 1), pad(mask_b, L - lb, 1)])
    return cache_a, mask
