"""The partition-by-partition reduce equals the in-memory one, without holding the pair vectors."""

from __future__ import annotations

import threading

import pytest
import torch

from chameleon.config import ChameleonConfig
from chameleon.core.synth import UserPairs
from chameleon.data.artifacts import RunWriter
from chameleon.data.layout import read_partitions
from chameleon.job.reduce import reduce_all, reduce_users
from chameleon.job.reduce_stream import reduce_partitions
from chameleon.job.run import write_partition
from chameleon.job.tables import (
    attach_user_reduce,
    pairs_to_tables,
    reduce_subspace_config,
    tables_to_units,
    without_user_reduce,
)


def _user(uid: str, k: int, seed: int, group: str | None) -> UserPairs:
    g = torch.Generator().manual_seed(seed)
    kind = seed % 3
    shift = torch.zeros(2, 16)
    shift[:, kind] = 4.0
    return UserPairs(
        user_id=uid,
        group_id=group,
        selected=list(range(k)),
        history_embedding=torch.randn(16, generator=g) + shift[0],
        insight_p="p",
        insight_n="n",
        queries=[f"q{i}" for i in range(k)],
        personalized=[f"p{i}" for i in range(k)],
        neutral=[f"n{i}" for i in range(k)],
        emb_p=torch.randn(k, 2, 16, generator=g) + shift,
        emb_n=torch.randn(k, 2, 16, generator=g),
        heldout_queries=["hq"],
        heldout_texts=["ht"],
        style_features=torch.randn(5, generator=g) + kind,
    )


class CountingReads(RunWriter):
    """A run writer that counts reads of pair files."""

    pair_reads = 0
    _count_lock = threading.Lock()  # the reduce reads job.read_threads partitions at once

    def get_parquet(self, relpath):
        with self._count_lock:
            self.pair_reads += relpath.startswith("pairs/")
        return super().get_parquet(relpath)


@pytest.mark.parametrize(
    ("overrides", "map_side"),
    [
        ({"groups.features": "style"}, True),
        ({"groups.features": "contrast", "subspace.max_group_pairs": 20}, True),
        ({"groups.group_column": "group_id", "groups.small_groups": "drop"}, False),
    ],
    ids=["style", "contrast-sampled", "column-drop-no-map-results"],
)
def test_partition_reduce_equals_the_in_memory_reduce(local_store, overrides, map_side):
    cfg = ChameleonConfig().with_overrides(
        {
            "groups.n_groups": 3,
            "groups.min_group_size": 2,
            "subspace.ccs_steps": 100,
            "subspace.ccs_restarts": 1,
            "synth.pair_source": "insight",
            **overrides,
        }
    )
    # Ids out of order across partitions, uneven pair counts (one user with one pair: no edit).
    users = [_user(f"u{(7 * i) % 23:02d}", 1 if i == 5 else 3 + i % 4, i, f"g{i % 4}") for i in range(23)]
    writer = CountingReads(local_store, "r")
    for k in range(0, len(users), 5):
        pairs, profiles = pairs_to_tables(users[k : k + 5])
        if map_side:  # what process_partition stores: each user's own reduce
            data = tables_to_units(pairs, profiles, 2)
            red = reduce_users(data, reduce_subspace_config(cfg), [3, 5])
            profiles = attach_user_reduce(profiles, data, red, cfg, [3, 5])
        write_partition(writer, k // 5, pairs, profiles, [])
    n = (len(users) + 4) // 5
    pairs, profiles, _ = read_partitions(writer, n)
    want = reduce_all(pairs, without_user_reduce(profiles), cfg, [3, 5])
    writer.pair_reads = 0
    got, got_profiles, failures = reduce_partitions(writer, n, cfg, [3, 5])
    assert failures == [] and got_profiles.num_rows == len(users)
    assert got_profiles.column_names == without_user_reduce(profiles).column_names
    # With the map's per-user results, pair files are read only for the groups' samples.
    assert writer.pair_reads == n if map_side else writer.pair_reads == 2 * n
    assert got.data.H_P is None  # no pair vectors kept
    assert got.data.user_ids == want.data.user_ids == sorted(u.user_id for u in users)
    assert torch.equal(got.data.mask, want.data.mask) and torch.equal(got.users.keep, want.users.keep)
    assert torch.equal(got.users.has_edit, want.users.has_edit) and not bool(got.users.has_edit.all())
    assert torch.allclose(got.users.sub.theta_p, want.users.sub.theta_p, atol=1e-5)
    assert torch.allclose(got.users.steer[0], want.users.steer[0], atol=1e-6)
    # Each user's CCS stops at its own step: per-partition batches agree but for batched sums.
    assert torch.allclose(got.users.sub.theta_n, want.users.sub.theta_n, atol=1e-5)
    gw, gg = want.grouping, got.grouping
    assert gg.group_ids == gw.group_ids and torch.equal(gg.labels, gw.labels)
    assert gg.contributors == gw.contributors and gg.unpublished == gw.unpublished
    assert torch.equal(got.groups.n_pairs, want.groups.n_pairs)
    # Same pooled sample, so the same group edits.
    assert torch.allclose(got.group_steer[0], want.group_steer[0], atol=1e-6)
    assert torch.allclose(got.groups.theta_p, want.groups.theta_p, atol=1e-5)
    assert torch.allclose(got.groups.theta_n, want.groups.theta_n, atol=1e-5)
