"""Privacy: a floor of contributing users under every published group edit, and forgetting users."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_job_config

from chameleon.cli import main
from chameleon.config import ChameleonConfig
from chameleon.core.synth import UserPairs
from chameleon.data.artifacts import RunReader
from chameleon.data.storage import LocalStore, read_parquet_bytes
from chameleon.dev.demo import example_users
from chameleon.job.forget import runs_holding
from chameleon.job.local import run_local
from chameleon.job.reduce import reduce_all
from chameleon.job.tables import pairs_to_tables


def _user(uid: str, group: str, k: int, seed: int, center: torch.Tensor) -> UserPairs:
    g = torch.Generator().manual_seed(seed)
    return UserPairs(
        user_id=uid,
        group_id=group,
        selected=list(range(k)),
        history_embedding=center + 0.1 * torch.randn(16, generator=g),
        insight_p="p",
        insight_n="n",
        queries=[f"q{i}" for i in range(k)],
        personalized=[f"p{i}" for i in range(k)],
        neutral=[f"n{i}" for i in range(k)],
        emb_p=torch.randn(k, 2, 16, generator=g) + 3,
        emb_n=torch.randn(k, 2, 16, generator=g),
    )


def _column_groups() -> list[UserPairs]:
    """big_a and big_b: 4 users with pairs each; solo: 1 user; thin: 3 members, 2 with one pair
    only (no edit of their own, so their pairs enter no group edit)."""
    a, b = torch.zeros(16), torch.zeros(16)
    a[0], b[1] = 1.0, 1.0
    users = [_user(f"a{i}", "big_a", 5, i, a) for i in range(4)]
    users += [_user(f"b{i}", "big_b", 5, 10 + i, b) for i in range(4)]
    users += [_user("solo0", "solo", 5, 20, a)]
    users += [
        _user("thin0", "thin", 5, 30, b),
        _user("thin1", "thin", 1, 31, b),
        _user("thin2", "thin", 1, 32, b),
    ]
    return users


def _cfg(**overrides) -> ChameleonConfig:
    base = {
        "groups.group_column": "group_id",
        "groups.min_contributors": 3,
        "subspace.ccs_steps": 20,
        "subspace.ccs_restarts": 1,
        "subspace.pair_cos_max": 1.0,
    }
    return ChameleonConfig().with_overrides({**base, **overrides})


def _members_with_pairs(reduced, j: int) -> int:
    g = reduced.grouping
    return int(((g.labels == j) & g.pools & (reduced.users.keep.sum(1) > 0)).sum())


@pytest.mark.parametrize("policy", ["merge", "drop"])
def test_every_published_group_has_enough_contributing_users(policy):
    reduced = reduce_all(*pairs_to_tables(_column_groups()), _cfg(**{"groups.small_groups": policy}), [3, 5])
    g = reduced.grouping
    assert g.group_ids == ["big_a", "big_b"]
    below = [gid for j, gid in enumerate(g.group_ids) if g.contributors[j] < 3]
    assert below == []  # groups_below_min_contributors=0
    # n_users counts contributors honestly: members whose pairs entered the pooled subspace.
    for j in range(len(g.group_ids)):
        assert g.contributors[j] == _members_with_pairs(reduced, j) == int(reduced.groups.n_pairs[j]) // 5
    assert sum(g.sizes) == 12  # every user still has a group
    gone = {row["group_id"]: row for row in g.unpublished}
    assert set(gone) == {"solo", "thin"} and gone["solo"]["contributors"] == 1
    assert gone["thin"] == {**gone["thin"], "contributors": 1, "members": 3}
    idx = {u: i for i, u in enumerate(reduced.data.user_ids)}
    if policy == "merge":  # into the group with the nearest history centroid
        assert gone["solo"]["into"] == "big_a" and gone["thin"]["into"] == "big_b"
        assert g.contributors == [5, 5]
    else:  # dropped: placed by history like unseen users, their pairs pooled nowhere
        assert all(row["action"] == "dropped" for row in g.unpublished)
        assert g.assigned_by[idx["solo0"]] == "history" and not bool(g.pools[idx["solo0"]])
        assert g.group_ids[int(g.labels[idx["solo0"]])] == "big_a"
        assert g.contributors == [4, 4]


def test_no_publishable_group_is_a_clear_error():
    # At most 2 pairs enter any group edit: never 3 contributing users, whatever is merged.
    cfg = _cfg(**{"subspace.max_group_pairs": 2})
    with pytest.raises(ValueError, match="groups.min_contributors=3"):
        reduce_all(*pairs_to_tables(_column_groups()), cfg, [3, 5])
    # Clustered groups obey the same floor.
    cfg = _cfg(
        **{
            "groups.group_column": None,
            "groups.features": "subspace",
            "groups.n_groups": 4,
            "groups.min_group_size": 1,
        }
    )
    g = reduce_all(*pairs_to_tables(_column_groups()), cfg, [3, 5]).grouping
    assert min(g.contributors) >= 3


def _objects_text(store: LocalStore, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix`, as stored plus (Parquet) its decoded rows as JSON: a value in a
    compressed column is found too."""
    out = {}
    for key in store.list(prefix):
        data = store.get_bytes(key)
        if key.endswith(".parquet"):
            rows = read_parquet_bytes(data).to_pylist()
            data += json.dumps(rows, ensure_ascii=False, default=repr).encode()
        out[key] = data
    return out


def _needles(user: dict) -> list[bytes]:
    texts = [user["user_id"], user["query"]] + [h["text"] for h in user["history"]]
    return [t.encode() for t in texts] + [json.dumps(t)[1:-1].encode() for t in texts]


def test_forget_publishes_a_run_without_any_byte_of_the_user(tmp_path, tiny_model_dir):
    users = example_users(1)
    secret = {
        "user_id": "forget-me",
        "history": [{"text": f"zebra marmalade quantum {i} \u00e9t\u00e9 \U0001f993"} for i in range(4)],
        "query": "Paraphrase: my very own query about marmalade zebras",
    }
    path = tmp_path / "users.jsonl"
    rejected_copy = {"user_id": "forget-me", "history": []}  # a reject that names the user
    path.write_text("".join(json.dumps(u) + "\n" for u in [*users, secret, rejected_copy]))
    store = LocalStore(tmp_path / "store")
    # Uncalibrated edits: forget then needs no model (the calibrated path runs the same code plus
    # calibrate_in_process, covered by the job tests).
    cfg = tiny_job_config(tiny_model_dir, **{"groups.n_groups": 2, "edit.calibrate": False})
    run_local(str(path), store, "before", cfg, progress=False)
    # The scan finds the user where the user is.
    old = _objects_text(store, "runs/before/")
    assert any(n in data for data in old.values() for n in _needles(secret))
    holding = runs_holding(store, ["forget-me", "nobody"])
    assert {r: sorted(h.users) for r, h in holding.items()} == {"before": ["forget-me"]}

    assert main(["forget", "--user", "forget-me", "--store", str(store.root), "--list"]) == 0
    rc = main(
        ["forget", "--user", "forget-me", "--store", str(store.root), "--new-run-id", "after", "--delete-old"]
    )
    assert rc == 0
    assert store.get_text("latest").strip() == "after" and not store.list("runs/before/")
    found = [
        (key, n)
        for key, data in _objects_text(store, "runs/after/").items()
        for n in _needles(secret)
        if n in data
    ]
    assert found == []  # user_bytes_found=0
    manifest = RunReader(store, "after").manifest
    assert manifest.forget.model_dump() == {"source_run": "before", "users_removed": 1, "rejects_removed": 1}
    assert manifest.counts.accepted == len(users) and manifest.counts.users_mapped == len(users)
    assert all(g.n_users >= cfg.groups.min_contributors for g in manifest.groups)
    assert runs_holding(store, ["forget-me"]) == {}
    # Forgetting a user no run holds publishes nothing.
    runs_before = store.list("runs/")
    assert main(["forget", "--user", "forget-me", "--store", str(store.root)]) == 0
    assert store.list("runs/") == runs_before
