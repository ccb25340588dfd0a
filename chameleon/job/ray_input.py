"""The Ray driver's input: read and validate the users files on the cluster, never on the driver.

    files (`data.inputs.expand_input`) ─ Ray Data: one task per file reads and validates it
        (`data.inputs.prepare_input`), writes its rejects (`rejects/file-F.jsonl`, with reasons)
      ─ ids only: a groupby count finds ids accepted in more than one record (all copies rejected,
        `rejects/duplicates.jsonl`, as for one file)
      ─ the accepted records, keyed by a stable hash of the user id (`job.staging.hash_partition`),
        grouped per partition: each group's records, sorted by id, are written to the run's
        attempt folder (`inputs/part-K.jsonl`) for the map actors to read

The driver gets one small row per file and per partition (counts, digests, user ids), and the
duplicate records (rare): the users' histories never reach it. A file is read by one task, so a
very large input is best split into many files (any number, in a directory or a glob).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray

from chameleon.config import ChameleonConfig
from chameleon.core.records import UserRecord
from chameleon.data.artifacts import RunWriter
from chameleon.data.inputs import expand_input, prepare_input
from chameleon.data.schema import Reject, json_safe
from chameleon.data.storage import Store
from chameleon.job.staging import StagedInput, hash_partition, jsonl_safe_rows

DUPLICATES = "rejects/duplicates.jsonl"


def _where(ds: ray.data.Dataset, predicate) -> ray.data.Dataset:
    """`ds.filter(predicate)` without Ray Data's console hint to prefer `expr=`: these predicates
    test membership in a Python set, and the hint would break the job's quiet console."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Use 'expr' instead of 'fn'.*")
        return ds.filter(predicate)


@contextlib.contextmanager
def _sort_shuffle() -> Iterator[None]:
    """Ray Data's sort-based shuffle for the groupbys below. Its default hash shuffle starts a
    pool of aggregator actors per groupby, about 6 s on 2 cores however small the input; the
    sort-based one runs as tasks (0.1 s on 12 users) and still spills to the object store at
    millions of rows."""
    from ray.data.context import DataContext, ShuffleStrategy

    ctx = DataContext.get_current()
    saved, ctx.shuffle_strategy = ctx.shuffle_strategy, ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.shuffle_strategy = saved


def rejects_key(file_index: int) -> str:
    return f"rejects/file-{file_index:05d}.jsonl"


def input_key(k: int) -> str:
    """Partition k's validated records, staged for the map actors (not a published file)."""
    return f"inputs/part-{k:05d}.jsonl"


def _read_files(
    batch: dict[str, np.ndarray], *, cfg_json: str, store: Store, run_id: str, attempt: str, options: dict
) -> dict[str, list]:
    """Read and validate one file per row; write its rejects; one row per accepted user, plus
    one `file` row with the file's counts and the rejects file's entry."""
    cfg = ChameleonConfig.model_validate_json(cfg_json)
    writer = RunWriter(store, run_id, attempt=attempt)
    out: dict[str, list] = {"kind": [], "user_id": [], "record": [], "info": []}
    for index, uri in zip(batch["index"], batch["file"], strict=True):
        prepared = prepare_input(str(uri), cfg, **options)
        rows = [{**r.to_dict(), "file": str(uri)} for r in prepared.rejects]
        entry = writer.put_jsonl(rejects_key(int(index)), jsonl_safe_rows(rows))
        info = {"records": prepared.n_input, "rejected": len(rows), "entry": entry, "index": int(index)}
        out["kind"].append("file")
        out["user_id"].append("")
        out["record"].append("")
        out["info"].append(json.dumps(info))
        for u in prepared.users:
            out["kind"].append("user")
            out["user_id"].append(u.user_id)
            out["record"].append(json.dumps(u.to_dict(), ensure_ascii=False))
            out["info"].append(str(uri))
    return out


def _with_partition(batch: dict[str, np.ndarray], *, n_partitions: int) -> dict[str, Any]:
    batch["partition"] = np.array([hash_partition(str(u), n_partitions) for u in batch["user_id"]])
    return batch


def _write_partition_input(
    batch: dict[str, np.ndarray], *, store: Store, run_id: str, attempt: str
) -> dict[str, list]:
    """One partition's records (a group of the groupby), sorted by id, written for the actors."""
    k = int(batch["partition"][0])
    order = sorted(range(len(batch["user_id"])), key=lambda i: str(batch["user_id"][i]))
    lines = [str(batch["record"][i]) for i in order]
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    writer = RunWriter(store, run_id, attempt=attempt)
    entry = writer.put_bytes(input_key(k), data)
    digest = hashlib.sha256(data).hexdigest()
    ids = [str(batch["user_id"][i]) for i in order]
    return {"partition": [k], "user_ids": [json.dumps(ids)], "entry": [json.dumps(entry)], "sha256": [digest]}


@_sort_shuffle()
def stage_input(input_uri: str, writer: RunWriter, cfg: ChameleonConfig, **store_options: Any) -> StagedInput:
    """Read, validate and hash-partition `input_uri` on the cluster into `writer`'s attempt
    folder; the rejects files are recorded in `writer`. Raises ValueError when no record is valid."""
    files = expand_input(input_uri, **store_options)
    common = {"store": writer.store, "run_id": writer.run_id, "attempt": writer.attempt}
    items = [{"index": i, "file": f} for i, f in enumerate(files)]
    read = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            _read_files,
            batch_size=1,
            fn_kwargs={"cfg_json": cfg.model_dump_json(), "options": store_options, **common},
        )
        .materialize()  # read once: the passes below run on the cluster's copy
    )
    file_rows = [json.loads(r["info"]) for r in _where(read, lambda r: r["kind"] == "file").take_all()]
    users = _where(read, lambda r: r["kind"] == "user")
    dup: dict[str, int] = {}
    if len(files) > 1:  # within one file, validation itself rejected every copy of a duplicate
        counts = users.groupby("user_id").count()
        dup = {r["user_id"]: int(r["count()"]) for r in _where(counts, lambda r: r["count()"] > 1).take_all()}
    rejects: list[dict] = []
    if dup:
        for r in _where(users, lambda r: r["user_id"] in dup).take_all():
            record = UserRecord.from_dict(json.loads(r["record"]))
            reason = f"duplicate user_id ({dup[r['user_id']]} records)"
            rejects.append(
                {
                    **Reject(-1, record.user_id, reason, json_safe(record.to_dict())).to_dict(),
                    "file": r["info"],
                }
            )
        users = _where(users, lambda r: r["user_id"] not in dup)
    n_accepted = sum(r["records"] for r in file_rows) - sum(r["rejected"] for r in file_rows) - len(rejects)
    if n_accepted <= 0:
        raise ValueError(
            f"{input_uri}: no valid user records ({sum(r['rejected'] for r in file_rows) + len(rejects)} rejected)"
        )
    n_partitions = max(1, math.ceil(n_accepted / cfg.job.users_per_partition))
    parts = (
        users.map_batches(_with_partition, fn_kwargs={"n_partitions": n_partitions}, batch_format="numpy")
        .groupby("partition")
        .map_groups(_write_partition_input, fn_kwargs=common, batch_format="numpy")
        .take_all()
    )
    for r in file_rows:
        writer.record_written(rejects_key(r["index"]), r["entry"])
    writer.put_jsonl(DUPLICATES, jsonl_safe_rows(rejects))
    staged = StagedInput(
        records=sum(r["records"] for r in file_rows),
        rejected=sum(r["rejected"] for r in file_rows) + len(rejects),
        partition_ids=[[] for _ in range(n_partitions)],
        inputs=[None] * n_partitions,
    )
    digests = [""] * n_partitions
    for r in parts:
        k = int(r["partition"])
        staged.partition_ids[k] = json.loads(r["user_ids"])
        staged.inputs[k] = json.loads(r["entry"])
        digests[k] = r["sha256"]
    staged.sha256 = hashlib.sha256(json.dumps(digests).encode()).hexdigest()
    return staged


def read_staged(store_run: Store, entry: dict[str, Any] | None) -> list[UserRecord]:
    """A partition's staged records (checked against the hash they were written with); none for
    a partition no user hashed to (`entry` None)."""
    if entry is None:
        return []
    data = store_run.get_bytes(entry["key"])
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"staged input {entry['key']} does not match its recorded hash")
    return [UserRecord.from_dict(json.loads(line)) for line in data.decode("utf-8").splitlines() if line]
