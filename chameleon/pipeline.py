"""The distributed job: Ray Data map over model-replica actors → reduce → publish.

    users file ─ validate (driver) ─ partitions ─▶ map_batches(PartitionWorker, actor pool)
                                                   each actor = one model replica; writes
                                                   pairs/profiles/failures of its partitions
               ◀─ reduce users, group, reduce groups, publish (driver; chameleon.runs)

The evaluation's answers (every method, many users, each row with its own edit or none) run on the
same kind of actor pool: `generate_answers_on_ray`.

The map stage runs exactly `chameleon.stages.process_partition`, the same function as the
in-process driver. Partitions are the unit of resume and of fault tolerance: a partition is done
when its pairs file exists, so a rerun with the same run id skips it, and a partition whose actor
died is retried on a restarted actor (Ray Data restarts actors and retries their tasks).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np

from chameleon.artifacts import ModelFingerprint, RunWriter, fingerprint_model
from chameleon.config import ChameleonConfig
from chameleon.local import prepare_input
from chameleon.runs import partition_done, partition_users, reduce_and_publish, write_partition, write_rejects
from chameleon.schema import parse_record
from chameleon.stages import candidate_layers, process_partition
from chameleon.storage import Store

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "model-fingerprint.json"


class PartitionWorker:
    """A Ray Data actor holding one model replica; maps partitions of users to pairs."""

    def __init__(self, cfg_json: str, store: Store, run_id: str, layers: list[int]) -> None:
        import torch  # noqa: PLC0415

        from chameleon.model import load_model  # noqa: PLC0415

        self.cfg = ChameleonConfig.model_validate_json(cfg_json)
        # Ray sets OMP_NUM_THREADS from the actor's CPUs; follow it so replicas don't oversubscribe.
        torch.set_num_threads(self.cfg.job.torch_threads or max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.model, self.tok = load_model(self.cfg.model)
        self.layers = layers
        self.writer = RunWriter(store, run_id)
        fp = fingerprint_model(self.model, self.cfg.model.name_or_path)
        # Every replica writes the same content; the driver reads it for the manifest.
        self.writer.put_json(FINGERPRINT_FILE, fp.to_dict())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"partition": [], "users": [], "failed": [], "seconds": [], "pid": []}
        for k, users_json in zip(batch["partition"], batch["users"], strict=True):
            t0 = time.perf_counter()
            users = [parse_record(u) for u in json.loads(str(users_json))]
            pairs, profiles, failures = process_partition(self.model, self.tok, users, self.cfg, self.layers)
            write_partition(self.writer, int(k), pairs, profiles, failures)
            out["partition"].append(int(k))
            out["users"].append(len(users))
            out["failed"].append(len(failures))
            out["seconds"].append(time.perf_counter() - t0)
            out["pid"].append(os.getpid())
        return out


def init_ray(address: str | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS; `auto` finds a running cluster); with neither, start
    a new local Ray (never silently attach to whatever cluster this machine last ran)."""
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=False)


def model_num_layers(cfg: ChameleonConfig) -> int:
    """Depth of the configured model from its config alone (the driver loads no weights)."""
    from transformers import AutoConfig  # noqa: PLC0415

    from chameleon.model import resolve_name  # noqa: PLC0415

    mc = AutoConfig.from_pretrained(resolve_name(cfg.model), revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    mc = mc.get_text_config() if hasattr(mc, "get_text_config") else mc
    return int(mc.num_hidden_layers)


def run_ray_job(
    input_uri: str,
    store: Store,
    run_id: str,
    cfg: ChameleonConfig,
    *,
    address: str | None = None,
    **store_options: Any,
) -> dict[str, Any]:
    """Run the job on a Ray cluster (a local one when no address is given); returns the manifest."""
    import ray  # noqa: PLC0415

    init_ray(address)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prepared = prepare_input(input_uri, cfg, **store_options)
    if not prepared.users:
        raise ValueError(f"{input_uri}: no valid user records ({len(prepared.rejects)} rejected)")
    layers = candidate_layers(model_num_layers(cfg), cfg.subspace)
    writer = RunWriter(store, run_id)
    write_rejects(writer, prepared.rejects)
    parts = partition_users(prepared.users, cfg.job.users_per_partition)
    todo = [k for k in range(len(parts)) if not partition_done(writer, k)]
    timings["load_s"] = time.perf_counter() - t0
    log.info("run %s: %d users in %d partitions, %d to map", run_id, len(prepared.users), len(parts), len(todo))

    t1 = time.perf_counter()
    if todo:
        items = [{"partition": k, "users": json.dumps([u.to_dict() for u in parts[k]])} for k in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            PartitionWorker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(cfg.job.num_actors, len(todo))),
            num_gpus=cfg.job.num_gpus_per_actor or None,
            num_cpus=cfg.job.num_cpus_per_actor,
            fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "store": store, "run_id": run_id, "layers": layers},
        )
        results = ds.take_all()
        failed = sum(r["failed"] for r in results)
        mapped = sum(r["users"] for r in results)
        if mapped and failed / mapped > cfg.job.max_user_failures:
            raise RuntimeError(f"{failed} of {mapped} users failed in the map stage (limit {cfg.job.max_user_failures:.0%}); see runs/{run_id}/failures/")
    missing = [k for k in todo if not partition_done(writer, k)]
    if missing:
        raise RuntimeError(f"partitions {missing} did not complete; rerun with --run-id {run_id} to resume")
    timings["map_s"] = time.perf_counter() - t1

    writer.record_existing(FINGERPRINT_FILE)
    fp = ModelFingerprint.from_dict(writer.run_store.get_json(FINGERPRINT_FILE))
    counts = {
        "records": prepared.n_input,
        "accepted": len(prepared.users),
        "rejected": len(prepared.rejects),
        "partitions": len(parts),
        "partitions_resumed": len(parts) - len(todo),
    }
    return reduce_and_publish(writer, cfg, layers, fp, cfg.model.name_or_path, len(parts), counts, timings)


# ---------------------------------------------------------------------------------------------
# Answer generation on the same actor pool (evaluation: every method's answers for many users)


def _pack_edits(edits: list[Any]) -> bytes:
    """Distinct edits of one shard as bytes (Arrow carries them; torch.save keeps dtypes exact)."""
    import io  # noqa: PLC0415

    import torch  # noqa: PLC0415

    buf = io.BytesIO()
    torch.save([{"site": e.site, **e.to_tensors()} for e in edits], buf)
    return buf.getvalue()


def _unpack_edits(blob: bytes) -> list[Any]:
    import io  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from chameleon.edit import Edit  # noqa: PLC0415

    out = []
    for t in torch.load(io.BytesIO(blob), weights_only=True):
        site = t.pop("site")
        out.append(Edit.from_tensors(t, site=site))
    return out


class AnswerWorker:
    """A Ray Data actor holding one model replica; maps shards of user messages (each with its
    own edit, or none) to greedy answers, with `chameleon.evaluation.generate_answers`, the
    function the in-process evaluation runs."""

    def __init__(self, cfg_json: str, edit_cfg_json: str, max_new_tokens: int, batch_size: int) -> None:
        import torch  # noqa: PLC0415

        from chameleon.config import EditConfig  # noqa: PLC0415
        from chameleon.model import load_model  # noqa: PLC0415

        self.cfg = ChameleonConfig.model_validate_json(cfg_json)
        torch.set_num_threads(self.cfg.job.torch_threads or max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.model, self.tok = load_model(self.cfg.model)
        self.edit_cfg = EditConfig.model_validate_json(edit_cfg_json)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from chameleon.evaluation import generate_answers  # noqa: PLC0415

        out: dict[str, list] = {"shard": [], "answers": []}
        for k, messages_json, rows_json, blob in zip(batch["shard"], batch["messages"], batch["edit_rows"], batch["edits"], strict=True):
            messages = json.loads(str(messages_json))
            rows = json.loads(str(rows_json))
            distinct = _unpack_edits(bytes(blob)) if blob else []
            edits = [None if r < 0 else distinct[r] for r in rows] if distinct else None
            answers = generate_answers(self.model, self.tok, messages, edits=edits, edit_cfg=self.edit_cfg,
                                       max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
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
    edits: list[Any] | None = None,
    edit_cfg: Any = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    address: str | None = None,
    shards_per_actor: int = 2,
) -> list[str]:
    """`evaluation.generate_answers` over a Ray Data actor pool (`cfg.job` sizes it as for the
    job's map stage): answers in input order. Each shard carries only the edits its rows use."""
    import ray  # noqa: PLC0415

    from chameleon.config import EditConfig  # noqa: PLC0415
    from chameleon.evaluation import distinct_edits  # noqa: PLC0415

    if edits is not None and len(edits) != len(messages):
        raise ValueError(f"{len(edits)} edits for {len(messages)} messages")
    init_ray(address)
    shards = answer_shards(len(messages), cfg.job.num_actors * shards_per_actor, batch_size)
    if not shards:
        return []
    items = []
    for k, idx in enumerate(shards):
        unique, rows = distinct_edits([edits[i] for i in idx] if edits is not None else [None] * len(idx))
        items.append({"shard": k, "messages": json.dumps([messages[i] for i in idx]), "edit_rows": json.dumps(rows),
                      "edits": _pack_edits(unique) if unique else b""})
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        AnswerWorker,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(cfg.job.num_actors, len(items))),
        num_gpus=cfg.job.num_gpus_per_actor or None,
        num_cpus=cfg.job.num_cpus_per_actor,
        fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "edit_cfg_json": (edit_cfg or EditConfig()).model_dump_json(),
                               "max_new_tokens": max_new_tokens, "batch_size": batch_size},
    )
    by_shard = {int(r["shard"]): json.loads(r["answers"]) for r in ds.take_all()}
    missing = [k for k in range(len(shards)) if k not in by_shard]
    if missing:
        raise RuntimeError(f"answer shards {missing} returned nothing")
    answers = [a for k in range(len(shards)) for a in by_shard[k]]
    if len(answers) != len(messages):
        raise RuntimeError(f"{len(answers)} answers for {len(messages)} messages")
    return answers
