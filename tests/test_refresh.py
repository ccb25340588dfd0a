"""Incremental refresh (`--update-from`): unchanged users reuse the source run's per-user results
(no model call), changed and new users are mapped, dropped users are gone; the result equals a
full run of the same input (tiny model, real store, both drivers)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_job_config

from chameleon.data.artifacts import RunReader
from chameleon.data.layout import done_key
from chameleon.dev.demo import example_users
from chameleon.job import refresh
from chameleon.job.local import run_local
from chameleon.job.spec import JobSpecMismatchError


def _write(path, users) -> str:
    path.write_text("".join(json.dumps(u) + "\n" for u in users))
    return str(path)


def _inputs(tmp_path):
    old = example_users(2)  # 12 users, 6 styles
    new = [dict(u) for u in old if u["user_id"] != "hashtag_fan-2"]  # dropped
    new[3] = {**new[3], "history": new[3]["history"] + [{"text": "a brand new tweet, so there"}]}
    new.append({**old[0], "user_id": "newcomer-1"})  # added (same history as another user)
    changed = {new[3]["user_id"], "newcomer-1"}
    return _write(tmp_path / "old.jsonl", old), _write(tmp_path / "new.jsonl", new), new, changed


def _mapped_users(monkeypatch) -> list[list[str]]:
    """The user ids handed to the model, one list per batch (the map stage's one entry point)."""
    seen: list[list[str]] = []
    real = refresh.process_partition

    def spy(model, tok, users, *args, **kwargs):
        seen.append([u.user_id for u in users])
        return real(model, tok, users, *args, **kwargs)

    monkeypatch.setattr(refresh, "process_partition", spy)
    return seen


def _partition_user_ids(reader: RunReader) -> list[list[str]]:
    """Each partition's users, from its done record."""
    return [
        reader.run_store.get_json(done_key(k))["user_ids"] for k in range(reader.manifest.counts.partitions)
    ]


def test_refresh_maps_only_changed_users_and_equals_a_full_run(
    tmp_path, local_store, tiny_model_dir, monkeypatch
):
    cfg = tiny_job_config(tiny_model_dir)
    old, new, new_users, changed = _inputs(tmp_path)
    run_local(old, local_store, "day-1", cfg, progress=False)
    mapped = _mapped_users(monkeypatch)
    manifest = run_local(new, local_store, "day-2", cfg, progress=False, update_from="day-1")
    # No model call for an unchanged user; the changed users of different partitions are mapped
    # in one batch (a batch's cost hardly depends on its size: one per partition would cost a
    # refresh of 1 % of the users about what a full run costs).
    assert len(mapped) == 1 and sorted(mapped[0]) == sorted(changed)
    unchanged = sorted({u["user_id"] for u in new_users} - changed)
    assert manifest.counts.users_reused == len(unchanged)
    assert manifest.job_spec["update_from"] == "day-1"
    reader = RunReader(local_store, "day-2")
    holding = {k for k, ids in enumerate(_partition_user_ids(reader)) if changed & set(ids)}
    assert len(holding) == 2  # the one batch above held the changed users of two partitions
    reused = [
        u for k in range(manifest.counts.partitions) for u in reader.run_store.get_json(done_key(k))["reused"]
    ]
    assert sorted(reused) == unchanged
    # The dropped user is gone from the new run; the newcomer is in it.
    assigned = refresh.PublishedRun(reader).assignments()
    assert "hashtag_fan-2" not in assigned and "newcomer-1" in assigned
    # A full run of the new input (same seeds): same per-user results, groups and edits.
    mapped.clear()
    run_local(new, local_store, "full", cfg, progress=False)
    # A full run maps partition by partition, as before.
    assert sorted(map(len, mapped)) == sorted(map(len, _partition_user_ids(reader)))
    assert sum(map(len, mapped)) == len(new_users)
    assert refresh.compare_runs(reader, RunReader(local_store, "full"), unchanged) == []


def test_refresh_from_a_run_made_under_other_settings_is_refused(tmp_path, local_store, tiny_model_dir):
    cfg = tiny_job_config(tiny_model_dir)
    old, new, _, _ = _inputs(tmp_path)
    run_local(old, local_store, "day-1", cfg, progress=False)
    other = cfg.with_overrides({"subspace.n_layers": 2})
    with pytest.raises(JobSpecMismatchError, match=r"cannot refresh run day-1.*subspace.n_layers"):
        run_local(new, local_store, "day-2", other, progress=False, update_from="day-1")


def test_ray_refresh_maps_changed_users_on_the_actors_that_then_calibrate(
    ray_local, tmp_path, s3_store, tiny_model_dir, monkeypatch
):
    from chameleon.job import ray_job

    pools, stages, bundles = [], [], []

    class CountingPool(ray_job.ReplicaPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(len(self.actors))

        def run(self, method, items, **kwargs):
            stages.append(method)
            if method == "map":  # the partitions of each item
                bundles.append([[p["partition"] for p in item["partitions"]] for item in items])
            return super().run(method, items, **kwargs)

    monkeypatch.setattr(ray_job, "ReplicaPool", CountingPool)
    cfg = tiny_job_config(tiny_model_dir, **{"job.num_actors": 1, "job.num_cpus_per_actor": 0.5})
    old, new, new_users, changed = _inputs(tmp_path)
    run_local(old, s3_store, "day-1", cfg, progress=False)
    manifest = ray_job.run_ray_job(new, s3_store, "day-2", cfg, update_from="day-1")
    # One pool of one actor (one model load) mapped, derived the marker directions, then
    # calibrated the groups: no second pool.
    assert pools == [1] and stages == ["map", "marker_directions", "calibrate"]
    # The one actor got every partition in one bundle (its changed users mapped together).
    assert bundles == [[list(range(manifest.counts.partitions))]] and manifest.counts.partitions > 1
    assert manifest.counts.users_reused == len(new_users) - len(changed)
    assert "calibrate_s" in manifest.timings_s and all(g.calibration is not None for g in manifest.groups)
    run_local(new, s3_store, "full", cfg, progress=False)
    unchanged = sorted({u["user_id"] for u in new_users} - changed)
    assert refresh.compare_runs(RunReader(s3_store, "day-2"), RunReader(s3_store, "full"), unchanged) == []


def test_sampled_answers_are_seeded_per_row_so_batchmates_do_not_change_them(tiny_model_dir):
    from chameleon.core.generation import chat_prompt, generate
    from chameleon.core.model import load_model

    model, tok = load_model(tiny_job_config(tiny_model_dir).model)
    prompts = [chat_prompt(tok, f"say something about {w}") for w in ("cats", "dogs", "rain")]
    kw = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.9}
    batch = generate(model, tok, prompts, row_seeds=[11, 22, 33], batch_size=3, **kw)
    alone = generate(model, tok, prompts[1:2], row_seeds=[22], **kw)
    assert batch[1] == alone[0]
    assert generate(model, tok, prompts[1:2], row_seeds=[23], **kw) != alone  # the seed counts
