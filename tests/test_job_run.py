"""The drivers' shared bookkeeping: partitions, the job spec, adoption on resume, the failure limit,
the users invariant, `latest` repair, group ids."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_job_config

from chameleon.core.fingerprint import fingerprint_model
from chameleon.core.model import load_model
from chameleon.core.records import HistoryItem, UserRecord
from chameleon.data.artifacts import RunReader, RunWriter, latest_run_id
from chameleon.data.layout import CENTROIDS, done_key, group_key, part_keys
from chameleon.data.published import PublishedRun
from chameleon.data.storage import LocalStore
from chameleon.dev.demo import example_users
from chameleon.job.local import run_local
from chameleon.job.publish import JobFailedError, check_users_accounted
from chameleon.job.run import adopt_partition, begin_run, partition_users, write_partition
from chameleon.job.spec import JobSpecMismatchError, model_identity
from chameleon.job.stages import process_partition
from chameleon.job.tables import pairs_to_tables


def _users_file(tmp_path, users):
    path = tmp_path / "users.jsonl"
    path.write_text("".join(json.dumps(u) + "\n" for u in users))
    return str(path)


def _record(i: int) -> UserRecord:
    return UserRecord(user_id=f"u{i}", history=(HistoryItem(text=f"tweet {i}"),))


def test_partitions_are_fixed_slices_in_input_order():
    users = [_record(i) for i in range(10)]
    parts = partition_users(users, 4)
    assert [[u.user_id for u in p] for p in parts] == [
        ["u0", "u1", "u2", "u3"],
        ["u4", "u5", "u6", "u7"],
        ["u8", "u9"],
    ]
    assert partition_users(users, 4) == parts  # a rerun maps the same users to the same ids


def test_a_partition_is_adopted_only_with_its_users_and_the_hashes_of_its_files(local_store, tiny_model_dir):
    users = [_record(i) for i in range(4)]
    model, tok = load_model(tiny_job_config(tiny_model_dir).model)
    cfg = tiny_job_config(tiny_model_dir)
    pairs, profiles, failures = process_partition(model, tok, users[:2], cfg, [1, 2])
    writer = RunWriter(local_store, "r1")
    writer.put_parquet(part_keys(0).profiles, profiles)  # died before the done record
    assert adopt_partition(RunWriter(local_store, "r1"), 0, users[:2]) is None
    write_partition(writer, 0, pairs, profiles, failures, user_ids=["u0", "u1"])
    resumed = RunWriter(local_store, "r1")
    assert adopt_partition(resumed, 0, users[:2]) is not None
    assert set(resumed.files) == set(part_keys(0).all())
    # Other users in the slice (another partition size, an edited input): not adopted.
    assert adopt_partition(RunWriter(local_store, "r1"), 0, users[:3]) is None
    assert adopt_partition(RunWriter(local_store, "r1"), 0, users[1:3]) is None
    # A file changed behind the record's back: not adopted.
    key = (
        "runs/r1/"
        + json.loads(local_store.get_bytes("runs/r1/" + done_key(0)))["files"][part_keys(0).pairs]["key"]
    )
    local_store.put_bytes(key, local_store.get_bytes(key) + b"x")
    assert adopt_partition(RunWriter(local_store, "r1"), 0, users[:2]) is None


def _failed_partition(store, run_id: str, records: list[UserRecord], mapped: int = 0, model_dir=None) -> None:
    """What an earlier attempt leaves when all but `mapped` users of partition 0 failed."""
    if mapped:
        model, tok = load_model(tiny_job_config(model_dir).model)
        layers = json.loads(store.get_bytes(f"runs/{run_id}/job-spec.json"))["captured_layers"]
        pairs, profiles, _ = process_partition(
            model, tok, records[:mapped], tiny_job_config(model_dir), layers
        )
        fp = fingerprint_model(model, str(model_dir))
    else:
        (pairs, profiles), fp = pairs_to_tables([]), None
    failures = [{"user_id": u.user_id, "reason": "map stage failed: boom"} for u in records[mapped:]]
    ids = [u.user_id for u in records]
    write_partition(RunWriter(store, run_id), 0, pairs, profiles, failures, user_ids=ids, fingerprint=fp)


def test_failure_limit_holds_over_adopted_partitions_and_on_every_rerun(
    tmp_path, local_store, tiny_model_dir
):
    users = example_users(1)[:6]  # 2 partitions of 4 and 2 users
    cfg = tiny_job_config(tiny_model_dir, **{"job.max_user_failures": 0.25, "groups.n_groups": 1})
    path = _users_file(tmp_path, users)
    plan = begin_run(path, local_store, "r1", cfg, model_identity(cfg))  # the run's spec
    _failed_partition(
        local_store, "r1", plan.partitions[0], mapped=1, model_dir=tiny_model_dir
    )  # 3 of 4 failed
    for _ in range(2):  # the first run and its rerun both refuse
        with pytest.raises(JobFailedError, match=r"3 of 6 users failed .*limit 25%"):
            run_local(path, local_store, "r1", cfg, progress=False)
        assert not local_store.exists("runs/r1/manifest.json")  # nothing published
    manifest = run_local(
        path, local_store, "r1", cfg.with_overrides({"job.max_user_failures": 0.75}), progress=False
    )
    assert manifest.counts.users_failed == 3 and manifest.counts.partitions_resumed == 2


def test_a_partition_in_which_every_user_failed_is_mapped_again(tmp_path, local_store, tiny_model_dir):
    users = example_users(1)[:6]
    cfg = tiny_job_config(tiny_model_dir, **{"groups.n_groups": 1})
    path = _users_file(tmp_path, users)
    plan = begin_run(path, local_store, "r1", cfg, model_identity(cfg))
    _failed_partition(local_store, "r1", plan.partitions[0])
    manifest = run_local(path, local_store, "r1", cfg, progress=False)
    c = manifest.counts
    assert c.partitions_resumed == 0 and c.users_failed == 0 and c.users_mapped == 6


def _identity(cfg, **changes):
    return {**model_identity(cfg), **changes}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"job.users_per_partition": 2}, r"partition size \(job.users_per_partition\) 4 -> 2"),
        ({"subspace.candidate_layers": [2, 3]}, r"captured layers \[1, 2\] -> \[2, 3\]"),
        ("delete-first-user", r"input \(6 -> 5 accepted users of 6 -> 5 records"),
        ("other-model", r"model config_sha256 "),
        ({"synth.pairs_per_user": 5}, r"config synth.pairs_per_user 4 -> 5"),
    ],
)
def test_resume_under_another_job_spec_is_refused_naming_what_differs(
    tmp_path, local_store, tiny_model_dir, change, message
):
    users = example_users(1)[:6]
    cfg = tiny_job_config(tiny_model_dir, **{"subspace.candidate_layers": [1, 2]})
    begin_run(_users_file(tmp_path, users), local_store, "r1", cfg, _identity(cfg))
    identity = _identity(cfg)
    if change == "delete-first-user":
        users = users[1:]
    elif change == "other-model":
        identity = _identity(cfg, config_sha256="0" * 64)
    else:
        cfg = cfg.with_overrides(change)
    path = _users_file(tmp_path, users)
    with pytest.raises(JobSpecMismatchError, match=message) as info:
        begin_run(path, local_store, "r1", cfg, identity)
    assert "--restart" in str(info.value)
    plan = begin_run(path, local_store, "r1", cfg, identity, restart=True)  # starts r1 over
    assert json.loads(local_store.get_bytes("runs/r1/job-spec.json")) == plan.spec
    assert plan.todo == list(range(len(plan.partitions)))


def test_restart_after_a_partition_size_change_publishes_every_user_once(
    tmp_path, local_store, tiny_model_dir
):
    users = example_users(1)[:8]
    cfg = tiny_job_config(tiny_model_dir, **{"groups.n_groups": 1})
    path = _users_file(tmp_path, users)
    model_and_tok = load_model(cfg.model)
    plan = begin_run(path, local_store, "r1", cfg, model_identity(cfg))
    for k in plan.todo[:1]:  # the job dies after one partition
        pairs, profiles, failures = process_partition(*model_and_tok, plan.partitions[k], cfg, plan.layers)
        write_partition(plan.run_writer, k, pairs, profiles, failures)
    smaller = cfg.with_overrides({"job.users_per_partition": 3})
    with pytest.raises(JobSpecMismatchError, match="partition size"):
        run_local(path, local_store, "r1", smaller, model_and_tokenizer=model_and_tok, progress=False)
    manifest = run_local(
        path, local_store, "r1", smaller, model_and_tokenizer=model_and_tok, progress=False, restart=True
    )
    ids = RunReader(local_store, "r1").get_parquet("assignments.parquet").column("user_id").to_pylist()
    assert sorted(ids) == sorted(u["user_id"] for u in users)  # each user exactly once
    assert manifest.counts.partitions_resumed == 0 and manifest.job_spec["partition_size"] == 3


def test_invariant_every_accepted_user_is_mapped_or_failed_exactly_once():
    check_users_accounted(["a", "b", "c"], ["a", "b"], ["c"], "r1")
    with pytest.raises(JobFailedError, match=r"1 users more than once .*'a'.*1 users missing .*'c'"):
        check_users_accounted(["a", "b", "c"], ["a", "b"], ["a"], "r1")
    with pytest.raises(JobFailedError, match=r"not in the input .*'gone'.*nothing was published"):
        check_users_accounted(["a"], ["a", "gone"], [], "r1")


class _LatestFailsOnce(LocalStore):
    """A real local store whose first write of `latest` fails (the driver dies right there)."""

    failed = False

    def put_bytes(self, key, data, *, if_absent=False):
        if key == "latest" and not _LatestFailsOnce.failed:
            _LatestFailsOnce.failed = True
            raise OSError("driver died between the manifest and latest")
        super().put_bytes(key, data, if_absent=if_absent)

    def child(self, prefix):
        return _LatestFailsOnce(self.root / prefix)


def test_a_crash_between_manifest_and_latest_is_repaired_by_a_rerun(tmp_path, tiny_model_dir):
    store = _LatestFailsOnce(tmp_path / "store")
    users = example_users(1)[:6]
    cfg = tiny_job_config(tiny_model_dir, **{"groups.n_groups": 1})
    path = _users_file(tmp_path, users)
    with pytest.raises(OSError, match="between the manifest and latest"):
        run_local(path, store, "r1", cfg, progress=False)
    assert store.exists("runs/r1/manifest.json") and latest_run_id(store) is None
    manifest = run_local(path, store, "r1", cfg, progress=False)  # nothing recomputed
    assert latest_run_id(store) == "r1" and manifest == RunReader(store, "latest").manifest


def test_group_ids_with_any_allowed_character_and_reserved_looking_names_publish(
    tmp_path, local_store, tiny_model_dir
):
    users = example_users(1)
    names = ["team:a", "team:a", "centroids", "centroids", "ops@x", "ops@x"]
    for u, name in zip(users, names, strict=True):
        u["team"] = name
    cfg = tiny_job_config(tiny_model_dir, **{"groups.group_column": "team"})
    manifest = run_local(_users_file(tmp_path, users), local_store, "r1", cfg, progress=False)
    assert sorted(g.group_id for g in manifest.groups) == ["centroids", "ops@x", "team:a"]
    reader = RunReader(local_store, "r1")
    assert {group_key(g) for g in ("centroids", "ops@x", "team:a")} | {CENTROIDS} <= set(reader.files)
    run = PublishedRun(reader)
    assert run.user_group(users[2]["user_id"]) == "centroids"
    assert run.group_edit("centroids").layers  # a group, not the centroids file
    assert run.group_edit("team:a") is run.group_edit("team:a")  # read once, then kept


def test_personalize_has_a_restart_flag_and_passes_storage_settings():
    from chameleon.cli import build_parser, s3_options
    from chameleon.config import ChameleonConfig

    args = build_parser().parse_args(["personalize", "--input", "u.jsonl", "--run-id", "r1", "--restart"])
    assert args.restart and args.run_id == "r1"
    assert not build_parser().parse_args(["personalize", "--input", "u.jsonl"]).restart
    cfg = ChameleonConfig().with_overrides({"storage.retry_deadline_s": 42})
    assert s3_options(args, cfg)["retry_deadline_s"] == 42


def test_partitions_mapped_with_other_model_weights_are_refused(tmp_path, local_store, tiny_model_dir):
    """Same model name and config, other weights: caught by the partitions' fingerprints."""
    users = example_users(1)[:4]  # one partition
    cfg = tiny_job_config(tiny_model_dir, **{"groups.n_groups": 1})
    path = _users_file(tmp_path, users)
    model_and_tok = load_model(cfg.model)
    plan = begin_run(path, local_store, "r1", cfg, model_identity(cfg))
    other = {**fingerprint_model(model_and_tok[0], "x").to_dict(), "weights_sha256": "0" * 64}
    pairs, profiles = pairs_to_tables([])
    write_partition(plan.run_writer, 0, pairs, profiles, [], user_ids=[u.user_id for u in plan.partitions[0]])
    record = json.loads(local_store.get_bytes("runs/r1/" + done_key(0)))
    local_store.put_bytes("runs/r1/" + done_key(0), json.dumps({**record, "fingerprint": other}).encode())
    with pytest.raises(JobFailedError, match="different model weights .*--restart"):
        run_local(path, local_store, "r1", cfg, model_and_tokenizer=model_and_tok, progress=False)
    assert not local_store.exists("runs/r1/manifest.json")
