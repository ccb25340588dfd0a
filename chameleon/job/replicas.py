"""Actor pools of model replicas on Ray Data: the job's map stage and the evaluation's answers.

Each actor of a pool holds one model replica (`cfg.job` sizes the pool: actors, GPUs and CPUs per
actor, as for the map stage) and maps one item at a time. `map_with_replicas` is the one way the
project runs model work on Ray. What an actor asks Ray for (`actor_resources`: `auto` GPUs from the
cluster's resources) and the device it then runs on (whatever torch sees there) are decided apart.

Failure is bounded (Ray Data's own default restarts actors and retries their tasks forever): an
actor restarts at most `job.max_actor_restarts` times, an item whose actor died is retried at most
`job.max_task_retries` times, an item still running after `job.partition_timeout_s` stops its
actor (`item_deadline`) and counts as such a death, and an actor that takes longer than
`job.actor_start_timeout_s` to come up (its first start or a restart, model load included) fails
the execution. Each wait has a bound of its own: time an actor spends restarting is never charged
to an item's deadline, nor an item's run to an actor's start.

`ReplicaPool` keeps its actors across stages (the job's map, then its calibration, on the same
loaded models); `map_with_replicas` runs one stage on a Ray Data actor pool (the evaluation's answers).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray
import torch

from chameleon.config import ChameleonConfig, EditConfig
from chameleon.core.devices import gpus_per_replica
from chameleon.core.edit import Edit
from chameleon.core.generation import distinct_edits, generate_answers
from chameleon.core.model import model_device, worker_torch_threads
from chameleon.data.model_mirror import load_model_for
from chameleon.ray_env import cluster_gpus, quiet_console, ray_init_kwargs


def init_ray(address: str | None = None) -> None:
    """Join `address` / RAY_ADDRESS or start a local Ray (`ray_env.ray_init_kwargs`) for the job's
    Ray driver, unless this process is connected already; a quiet console quiets Ray Data too."""
    if ray.is_initialized():
        return
    ray.init(**ray_init_kwargs(address))
    if quiet_console():
        _quiet_ray_data()


def _quiet_ray_data() -> None:
    """Ray Data in this driver: the global progress bar only (no per-operator bars), and on the
    console only errors (its execution plans and progress lines still go to ray-data.log)."""
    from ray.data import DataContext
    from ray.data._internal.logging import SessionFileHandler

    DataContext.get_current().enable_operator_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):
            handler.setLevel(logging.ERROR)


def cluster_gpu_capacity() -> float:
    """GPUs of the Ray cluster this process is connected to (`ray_env.cluster_gpus`): those it has
    now, or the most its autoscaler can add (a GPU group that scales from zero has none at the start)."""
    from ray._private.state import state

    try:  # the autoscaler's node types, as Ray Train reads them; None when not reported
        autoscaler_max = state.get_max_resources_from_cluster_config()
    except Exception:  # an older or a client-mode connection: what the cluster has now
        autoscaler_max = None
    return cluster_gpus(ray.cluster_resources(), autoscaler_max)


log = logging.getLogger(__name__)


class ModelReplica:
    """Base of the pools' actors: the config, torch threads, and the loaded model."""

    def __init__(self, cfg_json: str) -> None:
        self.cfg = ChameleonConfig.model_validate_json(cfg_json)
        worker_torch_threads(self.cfg.job.torch_threads)
        self.model, self.tok = load_model_for(self.cfg.model)
        if ray.get_gpu_ids() and model_device(self.model).type != "cuda":
            # Ray gave this actor a GPU that torch cannot use (a CPU-only torch, a broken driver).
            log.warning(
                "this actor holds GPUs %s but runs on the CPU: torch sees no CUDA device", ray.get_gpu_ids()
            )

    def ready(self) -> bool:
        """The pool's probe of an actor that died: answers once its restart has loaded the model."""
        return True


def actor_resources(cfg: ChameleonConfig) -> dict[str, float]:
    """What each actor of a pool asks Ray for: `job.num_gpus_per_actor` resolved against the
    cluster (`core.devices.gpus_per_replica`: `auto` is 1 GPU when it has GPUs, else none; GPUs
    asked of a cluster without them raise `NoGpuError` at once) and `job.num_cpus_per_actor`."""
    gpus = gpus_per_replica(
        cfg.job.num_gpus_per_actor, cluster_gpu_capacity(), setting_name="job.num_gpus_per_actor"
    )
    return {"num_gpus": gpus, "num_cpus": cfg.job.num_cpus_per_actor}


DEADLINE_EXIT_CODE = 75
"""Exit status of an actor stopped by `item_deadline` (in its log, next to the reason)."""


class Deadline:
    """Decides, once, whether a block finished before its deadline or the deadline stopped the
    actor: `finish` (the block ended) and `expire` (the timer fired) race, and only the first
    counts. A block that loses never returns its result: Ray could hand the actor, which is
    exiting, the next item, which would then be charged with this death."""

    def __init__(self, seconds: float, what: str, exit_process: Callable[[int], Any] = os._exit) -> None:
        self.seconds, self.what, self.exit_process = seconds, what, exit_process
        self._decided = threading.Lock()

    def expire(self) -> None:
        if not self._decided.acquire(blocking=False):
            return  # the block finished first
        print(
            f"chameleon: {self.what} passed its deadline of {self.seconds:g} s (job.partition_timeout_s); "
            "stopping this actor so that Ray retries it",
            file=sys.stderr,
            flush=True,
        )
        self.exit_process(DEADLINE_EXIT_CODE)

    def finish(self) -> bool:
        """True when the block finished in time; False when the deadline won (the actor is exiting)."""
        return self._decided.acquire(blocking=False)


@contextlib.contextmanager
def item_deadline(seconds: float, what: str) -> Iterator[None]:
    """Stop this actor's process when the block takes longer than `seconds`: a hung kernel cannot
    be interrupted from Python, and Ray then retries the item like one that killed its actor."""
    deadline = Deadline(seconds, what)
    timer = threading.Timer(seconds, deadline.expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if not deadline.finish():
            threading.Event().wait()  # the deadline fired as the block ended: wait for the exit


def map_with_replicas(
    items: list[dict[str, Any]],
    worker: type[ModelReplica],
    cfg: ChameleonConfig,
    *,
    drop_lost_items: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    **worker_kwargs: Any,
) -> list[dict[str, Any]]:
    """Run `worker` over `items` (one item per call) on an actor pool sized by `cfg.job`.

    An item whose actor died more than `job.max_task_retries` times fails the execution, or, with
    `drop_lost_items`, is left out of the results (the caller finds which are missing).
    `on_row` sees each result as it arrives (the caller then shows the progress, not Ray Data)."""
    resources = actor_resources(cfg)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.max_errored_blocks, ctx.execution_no_progress_timeout_s, ctx.enable_progress_bars
    ctx.enable_progress_bars = ctx.enable_progress_bars and on_row is None
    # Only actor deaths can lose an item: workers that drop items return their errors as rows.
    ctx.max_errored_blocks = -1 if drop_lost_items else 0
    # Ray Data has one no-progress bound: an actor's start and an item's run may both fall in it.
    ctx.execution_no_progress_timeout_s = cfg.job.actor_start_timeout_s + cfg.job.partition_timeout_s
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        with warnings.catch_warnings():
            # Ray warns that plain remote args are deprecated, yet names no replacement for these.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            ds = ds.map_batches(
                worker,
                batch_size=1,
                # One item per actor at a time: an actor that dies takes only its own item's retry
                # with it, so an innocent partition queued behind a poison one is never charged.
                compute=ray.data.ActorPoolStrategy(
                    size=min(cfg.job.num_actors, len(items)), max_tasks_in_flight_per_actor=1
                ),
                num_gpus=resources["num_gpus"] or None,
                num_cpus=resources["num_cpus"],
                # Ray Data's default for both is forever.
                max_restarts=cfg.job.max_actor_restarts,
                max_task_retries=cfg.job.max_task_retries,
                fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), **worker_kwargs},
            )
        rows = []
        for row in ds.iter_rows():  # streamed: each result as soon as its actor returns it
            rows.append(row)
            if on_row is not None:
                on_row(row)
        return rows
    finally:
        ctx.max_errored_blocks, ctx.execution_no_progress_timeout_s, ctx.enable_progress_bars = saved


class ReplicaPool:
    """Long-lived model-replica actors that serve several stages in turn (the job maps its
    partitions, then calibrates its groups on the same actors: each loads the model once).

    Bounded failure as in `map_with_replicas`: one item per actor at a time, an actor restarts at
    most `job.max_actor_restarts` times, an item whose actor died is retried by Ray at most
    `job.max_task_retries` times. An actor gets items only once a probe found it up; a probe not
    answered within `job.actor_start_timeout_s` fails the stage, and so does an item not answered
    within the time its tries may take (its deadline `item_deadline` stops it well before: that
    bound only catches an actor the deadline could not stop). An actor that used up its restarts
    is retired; when none is left, the stage fails at once.
    """

    def __init__(self, worker: type[ModelReplica], cfg: ChameleonConfig, n_actors: int, **worker_kwargs: Any):
        self.cfg = cfg
        resources = actor_resources(cfg)
        remote = ray.remote(worker).options(
            num_cpus=resources["num_cpus"],
            num_gpus=resources["num_gpus"] or None,
            max_restarts=cfg.job.max_actor_restarts,
            max_task_retries=cfg.job.max_task_retries,
        )
        self.actors = [remote.remote(cfg.model_dump_json(), **worker_kwargs) for _ in range(n_actors)]
        self.deaths = [0] * n_actors
        # Probes of actors starting or restarting ({ref: (actor, sent at)}): an actor gets no item
        # until its probe answers.
        self.probes: dict[Any, tuple[int, float]] = {}
        for a in range(n_actors):
            self._probe(a)

    def _usable(self, a: int) -> bool:
        return self.deaths[a] <= self.cfg.job.max_actor_restarts

    def _probe(self, a: int) -> None:
        # At-least-once, unlike the items: Ray holds it until the restarted actor is up, and fails
        # it only when the actor is gone for good (its restarts used up).
        self.probes[self.actors[a].ready.options(max_task_retries=-1).remote()] = (a, time.monotonic())

    def _item_timeout(self) -> float:
        # Every try of an item may wait for its actor's restart, then run up to its deadline.
        job = self.cfg.job
        return (job.max_task_retries + 1) * (job.actor_start_timeout_s + job.partition_timeout_s)

    def _first_expiry(self, pending: dict[Any, tuple[int, int, float]]) -> tuple[float, str]:
        """When the earliest outstanding wait runs out, and what it waited for."""
        waits = [
            (t + self.cfg.job.actor_start_timeout_s, f"actor {a} to start") for a, t in self.probes.values()
        ]
        waits += [(t + self._item_timeout(), f"item {i} on actor {a}") for a, i, t in pending.values()]
        return min(waits)

    def run(
        self,
        method: str,
        items: list[Any],
        *,
        drop_lost_items: bool = False,
        on_result: Callable[[Any], None] | None = None,
    ) -> dict[int, Any]:
        """`actor.method(item)` for every item; {item index: result}. An item lost with its actor
        (after Ray's retries) fails the stage, or with `drop_lost_items` is left out. `on_result`
        sees each result as soon as its actor returns it (a progress line).

        Only the item an actor was running when it died is charged with that death: the actor
        then gets no item until a probe finds it restarted (an item handed to an actor that is
        still restarting fails at once in Ray, through no fault of its own)."""
        queue = deque(range(len(items)))
        probing = {a for a, _ in self.probes.values()}
        idle = [a for a in range(len(self.actors)) if self._usable(a) and a not in probing]
        pending: dict[Any, tuple[int, int, float]] = {}  # {ref: (actor, item, sent at)}
        results: dict[int, Any] = {}
        last_death = ""
        while queue or pending:
            while queue and idle:
                a, i = idle.pop(0), queue.popleft()
                pending[getattr(self.actors[a], method).remote(items[i])] = (a, i, time.monotonic())
            if not pending and not self.probes:
                raise RuntimeError(
                    f"no actor of the pool is left: each failed to start or died more than "
                    f"job.max_actor_restarts={self.cfg.job.max_actor_restarts} times; "
                    f"{len(queue)} items were not run "
                    f"(last death: {last_death[:2000]})"
                )
            expiry, waited_for = self._first_expiry(pending)
            timeout = max(0.0, expiry - time.monotonic())
            ready, _ = ray.wait([*pending, *self.probes], num_returns=1, timeout=timeout)
            if not ready:
                raise RuntimeError(
                    f"the actor pool waited too long for {waited_for} (job.actor_start_timeout_s="
                    f"{self.cfg.job.actor_start_timeout_s:g}, job.partition_timeout_s="
                    f"{self.cfg.job.partition_timeout_s:g})"
                )
            if ready[0] in self.probes:
                a, _ = self.probes.pop(ready[0])
                try:
                    ray.get(ready[0])
                    idle.append(a)
                except ray.exceptions.RayActorError as exc:
                    self.deaths[a] = self.cfg.job.max_actor_restarts + 1  # gone for good: retired
                    last_death = str(exc)
                continue
            a, i, _ = pending.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
                if on_result is not None:
                    on_result(results[i])
            except ray.exceptions.RayActorError as exc:
                # Ray ran the item on restarts of its actor max_task_retries more times first.
                self.deaths[a] += self.cfg.job.max_task_retries + 1
                last_death = str(exc)
                if not drop_lost_items:
                    raise
                if self._usable(a):
                    self._probe(a)
                continue
            idle.append(a)
        return results

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


# ---------------------------------------------------------------------------------------------
# Answers (evaluation: every method's answers for many users, each row with its own edit or none)


def _pack_edits(edits: list[Edit]) -> bytes:
    """Distinct edits of one shard as bytes (Arrow carries them; torch.save keeps dtypes exact)."""
    buf = io.BytesIO()
    torch.save([{"site": e.site, **e.to_tensors()} for e in edits], buf)
    return buf.getvalue()


def _unpack_edits(blob: bytes) -> list[Edit]:
    out = []
    for t in torch.load(io.BytesIO(blob), weights_only=True):
        site = t.pop("site")
        out.append(Edit.from_tensors(t, site=site))
    return out


class AnswerWorker(ModelReplica):
    """Maps shards of user messages (each with its own edit, or none) to greedy answers with
    `core.generation.generate_answers`, the function the in-process evaluation runs."""

    def __init__(
        self, cfg_json: str, edit_cfg_json: str, system: str | None, max_new_tokens: int, batch_size: int
    ) -> None:
        super().__init__(cfg_json)
        self.edit_cfg = EditConfig.model_validate_json(edit_cfg_json)
        self.system, self.max_new_tokens, self.batch_size = system, max_new_tokens, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"shard": [], "answers": []}
        for k, messages_json, rows_json, blob in zip(
            batch["shard"], batch["messages"], batch["edit_rows"], batch["edits"], strict=True
        ):
            messages = json.loads(str(messages_json))
            rows = json.loads(str(rows_json))
            distinct = _unpack_edits(bytes(blob)) if blob else []
            edits = [None if r < 0 else distinct[r] for r in rows] if distinct else None
            answers = generate_answers(
                self.model,
                self.tok,
                messages,
                edits=edits,
                edit_cfg=self.edit_cfg,
                system=self.system,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
            )
            out["shard"].append(int(k))
            out["answers"].append(json.dumps(answers))
        return out


def answer_shards(n: int, n_shards: int, batch_size: int) -> list[range]:
    """Contiguous shards of `n` rows, each a whole number of batches where possible."""
    if n == 0:
        return []
    per = max(1, -(-n // max(1, n_shards)))
    per = -(-per // batch_size) * batch_size
    return [range(s, min(n, s + per)) for s in range(0, n, per)]


def generate_answers_on_ray(
    cfg: ChameleonConfig,
    messages: list[str],
    *,
    edits: list[Edit | None] | None = None,
    edit_cfg: EditConfig | None = None,
    system: str | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    address: str | None = None,
    shards_per_actor: int = 2,
) -> list[str]:
    """`generate_answers` over an actor pool: answers in input order. Each shard carries only the
    edits its rows use."""
    if edits is not None and len(edits) != len(messages):
        raise ValueError(f"{len(edits)} edits for {len(messages)} messages")
    init_ray(address)
    shards = answer_shards(len(messages), cfg.job.num_actors * shards_per_actor, batch_size)
    if not shards:
        return []
    items = []
    for k, idx in enumerate(shards):
        unique, rows = distinct_edits([edits[i] for i in idx] if edits is not None else [None] * len(idx))
        items.append(
            {
                "shard": k,
                "messages": json.dumps([messages[i] for i in idx]),
                "edit_rows": json.dumps(rows),
                "edits": _pack_edits(unique) if unique else b"",
            }
        )
    results = map_with_replicas(
        items,
        AnswerWorker,
        cfg,
        edit_cfg_json=(edit_cfg or EditConfig()).model_dump_json(),
        system=system,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    by_shard = {int(r["shard"]): json.loads(r["answers"]) for r in results}
    missing = [k for k in range(len(shards)) if k not in by_shard]
    if missing:
        raise RuntimeError(f"answer shards {missing} returned nothing")
    answers = [a for k in range(len(shards)) for a in by_shard[k]]
    if len(answers) != len(messages):
        raise RuntimeError(f"{len(answers)} answers for {len(messages)} messages")
    return answers
