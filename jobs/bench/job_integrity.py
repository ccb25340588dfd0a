"""The batch job keeps users' data whole: resume, actor deaths, concurrent writers, outages,
poison input, forgetting users, group privacy and driver memory.

    python jobs/bench/job_integrity.py [--only NAME ...] [--users 24] [--poison-users 100]
        [--mem-sizes 1000,10000] [--smoke] [--out FILE]

Everything runs on loopback: a local Ray, a SeaweedFS with generated keys, and a tiny random Llama
(hidden 64, 4 layers) with the embedded model's real tokenizer; the privacy and memory checks use
random pairs and no model. Each check is a function `check_<name>(workdir, args) -> dict` of
figures (`--only` picks some; a new check is one more such function): the figures of the chosen
checks print as `name=value`, the headline last.

    resume        a run stopped after 2 partitions, resumed after a change of partition size,
                  captured layers, input (first user deleted) or model weights:
                  stale_partitions_adopted, duplicate_users, records_lost, deleted_user_published
                  (all goal 0), resumes_refused
    chaos         a Ray run whose map actors are SIGKILLed --kills times (the first as soon as one
                  maps, then every --kill-every s): killed_actors,
                  artifact_mismatches against a clean run (goal 0)
    poison        a partition that kills its actor every time: the job ends within the configured
                  retries: hung_jobs (goal 0), poison_job_s
    writers       two jobs on one run id at once: committed_runs (1), losing_writer_refused (1),
                  checksum_mismatches of the committed run (goal 0)
    outage        the store paused (SIGSTOP) for 2 s mid-job (ridden out), then for longer than the
                  retries: outage_short_ridden_out, outage_failed_cleanly, outage_latest_kept
                  (goal 1), outage_manifest_written (goal 0)
    poison_input  --poison-users good users plus every malformed kind of `chameleon.dev.poison`,
                  as JSONL, as a LaMP JSON list and one Parquet file per odd schema, through the
                  job's first step (`job.run.begin_run`): records_lost (input records neither
                  accepted nor rejected) and crashes (goal 0; a file without any good row must
                  raise the clear "no valid user records" error, which is not counted)
    forget        hostile ids (`user`, `"alice "`, a line that is not JSON) in every hiding place
                  (an abandoned attempt, an abandoned job, an interrupted deletion), then
                  `forget_users` with `delete_old`; a byte scan of every object under the store:
                  forget_user_bytes_found, other_rejects_dropped (goal 0)   [integrity_store_checks]
    storage       the store capability probe; a store that ignores If-None-Match (moto behind a
                  loopback proxy that drops it) refused or detected: conditional_create_ignored;
                  each multipart part's checksum seen on the wire:
                  multipart_parts_without_checksum (goal 0)                 [integrity_store_checks]
    groups        column groups with a singleton and a group whose members mostly lack pairs,
                  both small-group policies, and clustered groups:
                  groups_below_min_contributors (goal 0)
    driver_memory peak RSS of a fresh process running the job's reduce and publish on stored
                  partitions of random pairs that carry their users' own reduce (the map
                  stage's work), per size in --mem-sizes: driver_memory_ratio = largest over
                  smallest (goal <= 1.5)

    integrity_violations = the sum of every goal-0 figure, every missed goal-1 figure, and 1 when
    driver_memory_ratio is above 1.5                                                   goal: 0
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import torch
from common import parse, parser, report, start_local_ray, stub_manifest, synthetic_user
from integrity_store_checks import check_forget, check_storage, stop_servers  # noqa: F401 (registered in CHECKS)

from chameleon.config import ChameleonConfig
from chameleon.core.fingerprint import fingerprint_model
from chameleon.core.synth import UserPairs
from chameleon.data.artifacts import RunWriter
from chameleon.data.inputs import prepare_input
from chameleon.data.storage import LocalStore
from chameleon.dev.poison import GOOD_KINDS, MALFORMED_KINDS, PARQUET_KINDS
from chameleon.job.publish import reduce_and_publish
from chameleon.job.reduce import reduce_all, reduce_users
from chameleon.job.run import begin_run, read_done_record, write_partition
from chameleon.job.tables import attach_user_reduce, pairs_to_tables, reduce_subspace_config, tables_to_units

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


BAD_WHEN_ABOVE_0 = (
    "stale_partitions_adopted",
    "duplicate_users",
    "records_lost",
    "deleted_user_published",
    "artifact_mismatches",
    "hung_jobs",
    "checksum_mismatches",
    "outage_manifest_written",
    "crashes",
    "forget_user_bytes_found",
    "other_rejects_dropped",
    "conditional_create_ignored",
    "multipart_parts_without_checksum",
    "groups_below_min_contributors",
)
DRIVER_MEMORY_GOAL = 1.5
BAD_WHEN_BELOW_1 = ("committed_runs", "losing_writer_refused", "outage_failed_cleanly", "outage_latest_kept")


# -- shared set-up (each check builds what it needs under `workdir`) ------------------------------


def users_file(workdir: Path, users: list[dict]) -> str:
    path = workdir / f"users-{uuid.uuid4().hex[:6]}.jsonl"
    path.write_text("".join(json.dumps(u) + "\n" for u in users))
    return str(path)


def synthetic_users(n: int) -> list[dict]:
    return [synthetic_user(i) for i in range(n)]


def tiny_model(workdir: Path, seed: int = 0) -> Path:
    from tiny_models import save_tiny_model

    path = workdir / f"model-{seed}"
    return path if (path / "config.json").exists() else save_tiny_model(path, seed=seed)


def job_config(model_dir: Path, **overrides):
    from chameleon.config import ChameleonConfig

    base = {
        "model.name_or_path": str(model_dir),
        "synth.pairs_per_user": 4,
        "synth.insight_max_new_tokens": 8,
        "synth.answer_max_new_tokens": 8,
        "synth.batch_size": 32,
        "subspace.ccs_steps": 100,
        "subspace.ccs_restarts": 3,
        "groups.n_groups": 2,
        "groups.min_group_size": 2,
        "edit.calibrate": False,
        "job.users_per_partition": 4,
        "job.num_cpus_per_actor": 0.5,
    }
    return ChameleonConfig().with_overrides({**base, **overrides})


_SERVERS: dict[str, object] = {}


def s3_store(workdir: Path, prefix: str, **options):
    """A fresh prefix on the bench's SeaweedFS (started once, real SigV4 keys)."""
    from chameleon.data.storage import S3Store
    from chameleon.dev.s3server import LocalS3Server

    if "shared" not in _SERVERS:
        _SERVERS["shared"] = LocalS3Server(backend="seaweedfs", data_dir=workdir / "s3").start()
    server = _SERVERS["shared"]
    return S3Store(
        "bench", f"{prefix}-{uuid.uuid4().hex[:6]}", create_bucket=True, **server.storage_options(), **options
    )


def ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=2, log_to_driver=False)


def published_ids(store, run_id: str) -> list[str]:
    from chameleon.data.artifacts import RunReader

    return RunReader(store, run_id).get_parquet("assignments.parquet").column("user_id").to_pylist()


def logical_hashes(manifest) -> dict[str, str]:
    """Checksums of what a run publishes, by logical path (attempt folders differ between runs)."""
    return {k: v.sha256 for k, v in manifest.files.items() if not k.startswith("failures/")}


# -- checks --------------------------------------------------------------------------------------


def check_resume(workdir: Path, args) -> dict:
    """Stop a run after 2 partitions, change one thing, rerun; then --restart."""
    from chameleon.core.model import load_model
    from chameleon.job.local import run_local
    from chameleon.job.publish import JobFailedError
    from chameleon.job.run import begin_run, write_partition
    from chameleon.job.spec import JobSpecMismatchError, model_identity
    from chameleon.job.stages import process_partition

    users = synthetic_users(args.users)
    cfg = job_config(tiny_model(workdir), **{"subspace.candidate_layers": [1, 2]})
    changes = {
        "partition_size": (cfg.with_overrides({"job.users_per_partition": 2}), users),
        "layers": (cfg.with_overrides({"subspace.candidate_layers": [2, 3]}), users),
        "input": (cfg, users[1:]),
        "model": (cfg.with_overrides({"model.name_or_path": str(tiny_model(workdir, seed=1))}), users),
    }
    figures = dict.fromkeys(
        ("stale_partitions_adopted", "duplicate_users", "records_lost", "deleted_user_published"), 0
    )
    figures["resumes_refused"] = 0
    for name, (changed, new_users) in changes.items():
        store = s3_store(workdir, f"resume-{name}")
        model_and_tok = load_model(cfg.model)
        plan = begin_run(users_file(workdir, users), store, "r", cfg, model_identity(cfg))
        for k in plan.todo[:2]:  # the first attempt dies after two partitions
            out = process_partition(*model_and_tok, plan.partitions[k], cfg, plan.layers)
            write_partition(plan.run_writer, k, *out)
        path = users_file(workdir, new_users)
        try:
            manifest = run_local(path, store, "r", changed, progress=False)
        except (JobSpecMismatchError, JobFailedError) as exc:
            print(f"# {name}: refused: {str(exc)[:160]}")
            figures["resumes_refused"] += 1
            manifest = run_local(path, store, "r", changed, progress=False, restart=True)
        figures["stale_partitions_adopted"] += manifest.counts.partitions_resumed
        ids = published_ids(store, "r")
        expected = {u["user_id"] for u in new_users}
        figures["duplicate_users"] += len(ids) - len(set(ids))
        figures["records_lost"] += len(expected - set(ids))
        figures["deleted_user_published"] += int(name == "input" and users[0]["user_id"] in ids)
    return figures


def _raylet():
    """The raylet of the Ray this process uses (its own, or the cluster it joined): its workers
    are the raylet's children."""
    import psutil
    import ray

    flag = f"--gcs-address={ray.get_runtime_context().gcs_address}"
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if cmdline and cmdline[0].endswith("raylet") and flag in cmdline:
            return p
    raise RuntimeError(f"no raylet with {flag} on this machine")


def _kill_workers_every(seconds: float, kills: int, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL a map actor as soon as one maps a partition, then again every `seconds`, `kills`
    times in all (Ray titles an actor's process after the method it runs, `PartitionWorker.map`:
    the model load and the calibration are left alone). Looking every 50 ms, a run of a few
    seconds still sees its kills; bounded, they cannot exhaust a partition's retries. Only this
    bench's Ray (its raylet's workers): other Ray instances on the machine are left alone."""
    import psutil

    raylet = _raylet()
    next_kill = 0.0
    while len(killed) < kills and not stop.wait(0.05):
        if time.monotonic() < next_kill:
            continue
        for p in raylet.children(recursive=True):
            try:
                if "PartitionWorker.map" in " ".join(p.cmdline()):
                    p.kill()
                    killed.append(p.pid)
                    next_kill = time.monotonic() + seconds
                    break
            except psutil.Error:
                continue


def check_chaos(workdir: Path, args) -> dict:
    """A Ray run with map actors killed every few seconds equals a clean run."""
    from chameleon.job.ray_job import run_ray_job

    ensure_ray()
    users = users_file(workdir, synthetic_users(args.users))
    cfg = job_config(
        tiny_model(workdir),
        **{"job.num_actors": 2, "job.max_task_retries": 20, "job.max_actor_restarts": 100},
    )
    clean = run_ray_job(users, s3_store(workdir, "clean"), "r", cfg)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_workers_every, args=(args.kill_every, args.kills, stop, killed))
    killer.start()
    try:
        chaos = run_ray_job(users, s3_store(workdir, "chaos"), "r", cfg)
    finally:
        stop.set()
        killer.join()
    a, b = logical_hashes(clean), logical_hashes(chaos)
    return {
        "killed_actors": len(killed),
        "artifact_mismatches": sum(a.get(k) != b.get(k) for k in set(a) | set(b)),
        "chaos_users_failed": chaos.counts.users_failed,
    }


def check_poison(workdir: Path, args) -> dict:
    """A partition whose user kills the actor every time: the job must end, naming it."""
    from chameleon.job.publish import JobFailedError
    from chameleon.job.ray_job import FAULTS_ENV, run_ray_job

    ensure_ray()
    users = synthetic_users(args.users)
    cfg = job_config(
        tiny_model(workdir),
        **{"job.num_actors": 2, "job.max_task_retries": args.poison_retries, "job.max_user_failures": 0.0},
    )
    os.environ[FAULTS_ENV] = json.dumps({"exit_on_user": users[len(users) // 2]["user_id"]})
    outcome: dict = {}
    # Made here: a SeaweedFS started from the job's thread would stop with it (PR_SET_PDEATHSIG).
    path, store = users_file(workdir, users), s3_store(workdir, "poison")

    def job() -> None:
        try:
            run_ray_job(path, store, "r", cfg)
            outcome["result"] = "published"
        except JobFailedError as exc:
            outcome["result"] = "failed"
            print(f"# poison: {str(exc)[:200]}")

    t0 = time.monotonic()
    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    thread.join(args.poison_limit_s)
    del os.environ[FAULTS_ENV]
    return {
        "hung_jobs": int(thread.is_alive()),
        "poison_job_failed": int(outcome.get("result") == "failed"),
        "poison_job_s": round(time.monotonic() - t0, 1),
    }


def check_writers(workdir: Path, args) -> dict:
    """Two in-process jobs on one run id at the same time."""
    from chameleon.core.model import load_model
    from chameleon.data.artifacts import ChecksumMismatchError, RunConflictError, RunImmutableError, RunReader
    from chameleon.job.local import run_local

    users = users_file(workdir, synthetic_users(args.users))
    cfg = job_config(tiny_model(workdir))
    store = s3_store(workdir, "writers")
    outcomes: list[str] = []

    def job(model_and_tok) -> None:
        try:
            run_local(users, store, "r", cfg, model_and_tokenizer=model_and_tok, progress=False)
            outcomes.append("committed")
        except (RunConflictError, RunImmutableError) as exc:
            print(f"# writers: {str(exc)[:200]}")
            outcomes.append("refused")

    # One model each (capture hooks are per model), loaded here: transformers' loading is not thread-safe.
    threads = [threading.Thread(target=job, args=(load_model(cfg.model),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader = RunReader(store, "r")
    mismatches = 0
    for rel in reader.files:
        try:
            reader.get_bytes(rel)
        except ChecksumMismatchError:
            mismatches += 1
    # A committed run read back by a second reader later (a zombie may have written meanwhile).
    return {
        "committed_runs": outcomes.count("committed"),
        "losing_writer_refused": int(outcomes.count("refused") == 1),
        "checksum_mismatches": mismatches,
    }


def check_outage(workdir: Path, args) -> dict:
    """The store paused mid-job: briefly (ridden out), then past the retries (clean failure)."""
    from chameleon.data.artifacts import RunWriter, latest_run_id
    from chameleon.data.storage import S3Store, StoreUnavailableError
    from chameleon.dev.s3server import LocalS3Server
    from chameleon.job.local import run_local

    users = users_file(workdir, synthetic_users(args.users))
    cfg = job_config(tiny_model(workdir))
    retry = {
        "read_timeout": 1.0,
        "connect_timeout": 1.0,
        "max_attempts": 2,
        "retry_deadline_s": args.outage_deadline_s,
    }
    figures = {}
    with LocalS3Server(backend="seaweedfs", data_dir=workdir / "s3-outage") as server:
        store = S3Store(
            "outage", uuid.uuid4().hex[:6], create_bucket=True, **server.storage_options(), **retry
        )
        pgid = os.getpgid(server._proc.pid)
        previous = RunWriter(store, "previous")
        previous.put_json("x.json", {})
        previous.commit(stub_manifest())

        def pause_after_first_partition(run_id: str, resume_after: float | None) -> None:
            while not store.exists(f"runs/{run_id}/parts/part-00000.json"):
                time.sleep(0.05)
            os.killpg(pgid, signal.SIGSTOP)
            if resume_after is not None:
                time.sleep(resume_after)
                os.killpg(pgid, signal.SIGCONT)

        for run_id, pause in (("short", 2.0), ("long", None)):
            watcher = threading.Thread(target=pause_after_first_partition, args=(run_id, pause))
            watcher.start()
            try:
                run_local(users, store, run_id, cfg, progress=False)
                figures[f"outage_{run_id}_ok"] = 1
            except StoreUnavailableError as exc:
                figures[f"outage_{run_id}_ok"] = 0
                print(f"# outage {run_id}: {str(exc)[:200]}")
            finally:
                watcher.join()
                os.killpg(pgid, signal.SIGCONT)
        return {
            "outage_short_ridden_out": figures["outage_short_ok"],
            "outage_failed_cleanly": 1 - figures["outage_long_ok"],
            "outage_manifest_written": int(store.exists("runs/long/manifest.json")),
            "outage_latest_kept": int(latest_run_id(store) == "short"),
        }


# -- poison input, privacy and driver memory (no Ray; random pairs instead of a model) -----------

POISON_CFG = ChameleonConfig()
POISON_MODEL = {"name_or_path": "random-llama", "revision": None, "config_sha256": "-", "num_layers": 4}


def _begin(path: Path, workdir: Path, name: str) -> tuple[int, int, int]:
    """(records, accepted, rejected) of the job's first step on a file; raises what it raises."""
    plan = begin_run(str(path), LocalStore(workdir / f"store-{name}"), "poison", POISON_CFG, POISON_MODEL)
    return plan.prepared.n_input, len(plan.prepared.users), len(plan.prepared.rejects)


def check_poison_input(workdir: Path, args) -> dict[str, int | float]:
    files: list[tuple[str, Path, int]] = []  # (name, path, records written)
    good = [GOOD_KINDS[i % len(GOOD_KINDS)].make(f"good-{i}", f"text {i}") for i in range(args.poison_users)]
    bad = [k.make(f"bad-{i}", "poison") for i, k in enumerate(MALFORMED_KINDS)]
    lines = good + bad
    jsonl = workdir / "users.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\n")
    files.append(("jsonl", jsonl, len(lines)))
    elements = good + [k.make(f"bad-{i}", "poison") for i, k in enumerate(MALFORMED_KINDS) if k.json_element]
    lamp = workdir / "questions.json"
    lamp.write_bytes(b"[" + b",\n".join(elements) + b"]")
    files.append(("lamp_json", lamp, len(elements)))
    for kind in PARQUET_KINDS:
        path = workdir / f"{kind.name}.parquet"
        ids = [f"{kind.name}-{i}" for i in range(5)]
        pq.write_table(kind.make(ids, [f"text {i}" for i in range(5)]), path)
        files.append((kind.name, path, 5))
    records = accepted = rejected = crashes = lost = 0
    for name, path, n in files:
        try:
            n_input, acc, rej = _begin(path, workdir, name)
        except ValueError as exc:
            if "no valid user records" not in str(exc):
                crashes += 1
                continue
            prepared = prepare_input(str(path), POISON_CFG)  # all rejected: still accounted for?
            n_input, acc, rej = prepared.n_input, len(prepared.users), len(prepared.rejects)
        except Exception:
            crashes += 1
            continue
        records += n
        accepted += acc
        rejected += rej
        lost += abs(n - (acc + rej)) + abs(n - n_input)
    return {
        "files": len(files),
        "malformed_kinds": len(MALFORMED_KINDS) + sum(not k.accepted for k in PARQUET_KINDS),
        "records": records,
        "accepted": accepted,
        "rejected": rejected,
        "crashes": crashes,
        "records_lost": lost,
    }


# -- synthetic runs (random pairs, no model) -----------------------------------------------------


def _synthetic_users(n: int, K: int, L: int, d: int, seed: int, groups: list[str] | None = None):
    g = torch.Generator().manual_seed(seed)
    styles = torch.randn(8, 21, generator=g)
    for i in range(n):
        uid = f"user-{seed}-{i:06d}"
        yield UserPairs(
            user_id=uid,
            group_id=groups[i % len(groups)] if groups else None,
            selected=list(range(K)),
            history_embedding=torch.randn(d, generator=g),
            insight_p="p",
            insight_n="n",
            queries=[f"query {uid} {k}" for k in range(K)],
            personalized=[f"answer of {uid} number {k}" for k in range(K)],
            neutral=[f"neutral {k}" for k in range(K)],
            emb_p=torch.randn(K, L, d, generator=g) + 1.0,
            emb_n=torch.randn(K, L, d, generator=g),
            heldout_queries=[f"held-out query {uid}"],
            heldout_texts=[f"held-out text {uid}"],
            style_features=styles[i % 8] + 0.1 * torch.randn(21, generator=g),
        )


def _fingerprint(d: int, L: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=L, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)  # fmt: skip
    return fingerprint_model(LlamaForCausalLM(cfg).eval(), "random-llama")


def _bench_cfg(args, **overrides) -> ChameleonConfig:
    base = {
        "edit.calibrate": False,
        "subspace.ccs_steps": args.ccs_steps,
        "subspace.ccs_restarts": 2,
        "job.users_per_partition": 64,
    }
    return ChameleonConfig().with_overrides({**base, **overrides})


def write_synthetic_run(
    store: LocalStore, run_id: str, n_users: int, args, seed: int = 0, cfg: ChameleonConfig | None = None
) -> tuple[RunWriter, int, dict]:
    """Partitions of random pairs in a run that is still open; returns (writer, partitions,
    counts). With `cfg`, each partition also stores its users' own reduce, as the map stage does."""
    writer = RunWriter(store, run_id)
    writer.put_jsonl("rejects.jsonl", [])
    size = 64
    users = _synthetic_users(n_users, args.pairs, args.layers, args.hidden, seed)
    n_parts = 0
    while True:
        part = [u for _, u in zip(range(size), users, strict=False)]
        if not part:
            break
        pairs, profiles = pairs_to_tables(part)
        if cfg is not None:
            data = tables_to_units(pairs, profiles, args.layers)
            red = reduce_users(data, reduce_subspace_config(cfg), list(range(args.layers)))
            profiles = attach_user_reduce(profiles, data, red, cfg, list(range(args.layers)))
        write_partition(writer, n_parts, pairs, profiles, [])
        n_parts += 1
    counts = {"records": n_users, "accepted": n_users, "rejected": 0, "partitions": n_parts}
    return writer, n_parts, counts


def check_groups(workdir: Path, args) -> dict[str, int | float]:
    names = ["big_a"] * 6 + ["big_b"] * 6 + ["solo"] + ["thin"] * 3
    users = list(_synthetic_users(len(names), args.pairs, args.layers, args.hidden, seed=3, groups=names))
    for u in users[-2:]:  # two members of `thin` with one pair: no edit of their own
        u.queries, u.personalized, u.neutral = u.queries[:1], u.personalized[:1], u.neutral[:1]
        u.emb_p, u.emb_n = u.emb_p[:1], u.emb_n[:1]
    below = unpublished = 0
    layers = list(range(args.layers))
    for policy in ("merge", "drop"):
        cfg = _bench_cfg(args, **{"groups.group_column": "group_id", "groups.small_groups": policy})
        g = reduce_all(*pairs_to_tables(users), cfg, layers).grouping
        below += sum(c < cfg.groups.min_contributors for c in g.contributors)
        unpublished += len(g.unpublished)
        # Clustered groups obey the floor as well.
        cfg = _bench_cfg(
            args, **{"groups.small_groups": policy, "groups.n_groups": 6, "groups.min_group_size": 1}
        )
        g = reduce_all(*pairs_to_tables(users), cfg, layers).grouping
        below += sum(c < cfg.groups.min_contributors for c in g.contributors)
    return {"groups_unpublished": unpublished, "groups_below_min_contributors": below}


def _reduce_child(store_dir: str, run_id: str, args) -> None:
    """In a fresh process: reduce and publish a stored run; print its peak RSS (MiB)."""
    store = LocalStore(store_dir)
    meta = json.loads((Path(store_dir) / "meta.json").read_text())
    fp = _fingerprint(args.hidden, args.layers)
    writer = RunWriter(store, run_id)
    writer.put_jsonl("rejects.jsonl", [])
    for k in range(meta["partitions"]):  # a resumed driver's view: the partitions' done records
        for rel, entry in read_done_record(writer, k)["files"].items():
            writer.adopt(rel, entry)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    reduce_and_publish(
        writer,
        cfg=_bench_cfg(args),
        layers=list(range(args.layers)),
        fingerprint=fp,
        n_partitions=meta["partitions"],
        counts=meta["counts"],
        timings={},
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak, "before_reduce_mb": base, "seconds": time.perf_counter() - t0}))


def check_driver_memory(workdir: Path, args) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    peaks = []
    for n in [int(x) for x in args.mem_sizes.split(",")]:
        store_dir = workdir / f"mem-{n}"
        store = LocalStore(store_dir)
        _, n_parts, counts = write_synthetic_run(store, "mem", n, args, cfg=_bench_cfg(args))
        (store_dir / "meta.json").write_text(json.dumps({"partitions": n_parts, "counts": counts}))
        cmd = [sys.executable, __file__, "--reduce-child", str(store_dir), *_shape_flags(args)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            raise RuntimeError(f"reduce of {n} users failed:\n{res.stderr[-3000:]}")
        fig = json.loads(res.stdout.strip().splitlines()[-1])
        out[f"driver_peak_mb_{n}"] = round(fig["peak_mb"], 1)
        out[f"driver_reduce_growth_mb_{n}"] = round(fig["peak_mb"] - fig["before_reduce_mb"], 1)
        out[f"reduce_s_{n}"] = round(fig["seconds"], 1)
        peaks.append(fig["peak_mb"])
    out["driver_memory_ratio"] = round(peaks[-1] / peaks[0], 3)
    return out


def _shape_flags(args) -> list[str]:
    return [
        f"--hidden={args.hidden}",
        f"--layers={args.layers}",
        f"--pairs={args.pairs}",
        f"--ccs-steps={args.ccs_steps}",
    ]


CHECKS = {
    name.removeprefix("check_"): fn for name, fn in sorted(globals().items()) if name.startswith("check_")
}


def main() -> None:
    import tempfile

    p = parser(__doc__)
    p.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="checks to run (default: all)")
    p.add_argument("--users", type=int, default=24, help="users per job")
    p.add_argument("--kill-every", type=float, default=10.0, help="chaos: seconds between actor kills")
    p.add_argument("--kills", type=int, default=3, help="chaos: actor kills in all")
    p.add_argument(
        "--poison-limit-s", type=float, default=300.0, help="poison: a job still running then is hung"
    )
    p.add_argument(
        "--poison-retries",
        type=int,
        default=2,
        help="poison: job.max_task_retries (each retry restarts an actor)",
    )
    p.add_argument("--outage-deadline-s", type=float, default=5.0, help="outage: the store's retry deadline")
    p.add_argument("--poison-users", type=int, default=100, help="poison_input and forget: good users")
    p.add_argument("--mem-sizes", default="1000,10000", help="driver_memory: user counts, comma-separated")
    p.add_argument("--hidden", type=int, default=64, help="random pairs: hidden size")
    p.add_argument("--layers", type=int, default=6, help="random pairs: captured layers")
    p.add_argument("--pairs", type=int, default=8, help="random pairs: pairs per user")
    p.add_argument("--ccs-steps", type=int, default=100, help="random pairs: CCS steps of the reduce")
    p.add_argument("--reduce-child", help=argparse.SUPPRESS)
    # Smoke: the checks of this file (forget and storage have integrity_store_checks.py's smoke run)
    # at a tiny size; two actor kills are enough to see the chaos check work.
    smoke = {
        "users": 6,
        "kill_every": 2.0,
        "kills": 2,
        "poison_users": 8,
        "mem_sizes": "40,80",
        "layers": 2,
        "pairs": 2,
    }
    own_checks = [name for name in sorted(CHECKS) if name not in ("forget", "storage")]
    args = parse(
        p, {**smoke, "only": own_checks, "ccs_steps": 10, "poison_limit_s": 120.0, "poison_retries": 0}
    )
    if args.reduce_child:
        _reduce_child(args.reduce_child, "mem", args)
        return
    workdir = Path(tempfile.mkdtemp(prefix="chameleon-integrity-"))
    figures: dict = {}
    t0 = time.monotonic()
    try:
        for name in args.only or sorted(CHECKS):
            (workdir / name).mkdir()
            t_check = time.monotonic()
            figures.update(CHECKS[name](workdir / name, args))
            print(f"# {name}: {time.monotonic() - t_check:.1f} s", flush=True)
    finally:
        for server in _SERVERS.values():
            server.stop()
        stop_servers()
        import ray

        # Ray's notices of the killed actors reach this driver's stdout at any time while it is
        # connected: disconnect first, so none can follow the headline line.
        ray.shutdown()
    figures["wall_s"] = round(time.monotonic() - t0, 1)
    figures["integrity_violations"] = sum(figures.get(k, 0) for k in BAD_WHEN_ABOVE_0) + sum(
        1 - figures[k] for k in BAD_WHEN_BELOW_1 if k in figures
    )
    figures["integrity_violations"] += int(figures.get("driver_memory_ratio", 0) > DRIVER_MEMORY_GOAL)
    report(
        figures,
        "integrity_violations",
        args.out,
        {"checks": args.only or sorted(CHECKS), "users": args.users},
    )


if __name__ == "__main__":
    main()
