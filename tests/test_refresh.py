"""Incremental refresh (`--update-from`): unchanged users reuse the source run's per-user results
(no model call), changed and new users are mapped, dropped users are gone; the result equals a
full run of the same input (tiny model, real store, both drivers)."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

import pytest
from conftest import TEST_BUCKET, tiny_job_config

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


def _mapped_users(monkeypatch) -> list[str]:
    """Every user id handed to the model (the map stage's one entry point)."""
    seen: list[str] = []
    real = refresh.process_partition

    def spy(model, tok, users, *args, **kwargs):
        seen.extend(u.user_id for u in users)
        return real(model, tok, users, *args, **kwargs)

    monkeypatch.setattr(refresh, "process_partition", spy)
    return seen


@pytest.fixture(scope="module")
def day_one(s3_server, tiny_model_dir, tmp_path_factory):
    """One store for the module's refreshes, with the runs they all compare against, made once:
    `day-1` (the old input) and `full` (a full run of the new input; `full_mapped`: the users it
    handed the model)."""
    cfg = tiny_job_config(tiny_model_dir, **{"job.num_actors": 1, "job.num_cpus_per_actor": 0.5})
    old, new, new_users, changed = _inputs(tmp_path_factory.mktemp("refresh"))
    store = s3_server.store(TEST_BUCKET, f"refresh-{uuid.uuid4().hex[:8]}")
    run_local(old, store, "day-1", cfg, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mapped = _mapped_users(mp)
        run_local(new, store, "full", cfg, progress=False)
    return SimpleNamespace(
        cfg=cfg, store=store, new=new, new_users=new_users, changed=changed, full_mapped=list(mapped)
    )


def test_refresh_maps_only_changed_users_and_equals_a_full_run(day_one, monkeypatch):
    store, changed, new_users = day_one.store, day_one.changed, day_one.new_users
    mapped = _mapped_users(monkeypatch)
    manifest = run_local(day_one.new, store, "day-2", day_one.cfg, progress=False, update_from="day-1")
    assert sorted(mapped) == sorted(changed)  # no model call for an unchanged user
    unchanged = sorted({u["user_id"] for u in new_users} - changed)
    assert manifest.counts.users_reused == len(unchanged)
    assert manifest.job_spec["update_from"] == "day-1"
    reader = RunReader(store, "day-2")
    reused = [
        u for k in range(manifest.counts.partitions) for u in reader.run_store.get_json(done_key(k))["reused"]
    ]
    assert sorted(reused) == unchanged
    # The dropped user is gone from the new run; the newcomer is in it.
    assigned = refresh.PublishedRun(reader).assignments()
    assert "hashtag_fan-2" not in assigned and "newcomer-1" in assigned
    # A full run of the new input (same seeds) mapped every user, and has the same per-user
    # results, groups and edits.
    assert len(day_one.full_mapped) == len(new_users)
    assert refresh.compare_runs(reader, RunReader(store, "full"), unchanged) == []


def test_refresh_from_a_run_made_under_other_settings_is_refused(day_one):
    other = day_one.cfg.with_overrides({"subspace.n_layers": 2})
    with pytest.raises(JobSpecMismatchError, match=r"cannot refresh run day-1.*subspace.n_layers"):
        run_local(day_one.new, day_one.store, "day-2-other", other, progress=False, update_from="day-1")


def test_ray_refresh_maps_changed_users_on_the_actors_that_then_calibrate(ray_local, day_one, monkeypatch):
    from chameleon.job import ray_job

    pools, stages = [], []

    class CountingPool(ray_job.ReplicaPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(len(self.actors))

        def run(self, method, items, **kwargs):
            stages.append(method)
            return super().run(method, items, **kwargs)

    monkeypatch.setattr(ray_job, "ReplicaPool", CountingPool)
    store, new_users, changed = day_one.store, day_one.new_users, day_one.changed
    manifest = ray_job.run_ray_job(day_one.new, store, "day-2-ray", day_one.cfg, update_from="day-1")
    # One pool of one actor (one model load) mapped, then calibrated: no second pool.
    assert pools == [1] and stages == ["map", "calibrate"]
    assert manifest.counts.users_reused == len(new_users) - len(changed)
    assert "calibrate_s" in manifest.timings_s and all(g.calibration is not None for g in manifest.groups)
    unchanged = sorted({u["user_id"] for u in new_users} - changed)
    assert refresh.compare_runs(RunReader(store, "day-2-ray"), RunReader(store, "full"), unchanged) == []


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
