"""The job's Ray-free stages: candidate layers, the partition tables' round trip, the reduce."""

from __future__ import annotations

import pytest
import torch

from chameleon.config import ChameleonConfig, EditConfig, SubspaceConfig
from chameleon.core.calibration import choose
from chameleon.core.style import history_style
from chameleon.core.synth import UserPairs
from chameleon.job.reduce import reduce_all
from chameleon.job.stages import candidate_layers
from chameleon.job.tables import pairs_to_tables, tables_to_units


def test_candidate_layers_span_the_middle_band_and_include_explicit_layers():
    layers = candidate_layers(30, SubspaceConfig())
    assert layers == sorted(set(layers)) and len(layers) == 6
    assert layers[0] == 30 // 4 and layers[-1] == (2 * 30) // 3
    assert candidate_layers(30, SubspaceConfig(candidate_layers=[3, 5], layers=[9])) == [3, 5, 9]
    with pytest.raises(ValueError, match=r"layers \[40\] out of range"):
        candidate_layers(30, SubspaceConfig(candidate_layers=[40]))


def _pairs(user_id: str, k: int, n_layers: int, d: int, seed: int, group: str | None = None) -> UserPairs:
    g = torch.Generator().manual_seed(seed)
    return UserPairs(
        user_id=user_id,
        group_id=group,
        selected=list(range(k)),
        history_embedding=torch.randn(d, generator=g),
        insight_p="p",
        insight_n="n",
        queries=[f"q{i}" for i in range(k)],
        personalized=[f"p{i}" for i in range(k)],
        neutral=[f"n{i}" for i in range(k)],
        emb_p=torch.randn(k, n_layers, d, generator=g),
        emb_n=torch.randn(k, n_layers, d, generator=g),
    )


def test_partition_tables_round_trip_to_dense_per_user_tensors():
    users = [_pairs("b", 3, 2, 8, 0, "g1"), _pairs("a", 5, 2, 8, 1)]  # unsorted, unequal pair counts
    pairs, profiles = pairs_to_tables(users)
    assert pairs.num_rows == 8 and profiles.num_rows == 2
    data = tables_to_units(pairs, profiles, n_layers=2)
    assert data.user_ids == ["a", "b"] and data.group_ids == [None, "g1"]  # sorted by id
    assert data.H_P.shape == (2, 5, 2, 8)
    assert data.mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert torch.equal(data.H_P[0], users[1].emb_p) and torch.equal(data.H_N[1, :3], users[0].emb_n)
    assert torch.equal(data.history_embedding[1], users[0].history_embedding)


def test_a_partition_without_pairs_still_makes_tables():
    pairs, profiles = pairs_to_tables([])
    assert pairs.num_rows == 0 and profiles.num_rows == 0


def test_reduce_all_gives_every_user_a_group_and_every_group_an_edit():
    cfg = ChameleonConfig().with_overrides(
        {
            "groups.n_groups": 2,
            "groups.min_group_size": 1,
            "groups.min_contributors": 1,
            "subspace.ccs_steps": 50,
            "subspace.ccs_restarts": 2,
            "subspace.n_layers": 1,
            "groups.features": "subspace",
        }
    )
    torch.manual_seed(0)
    users = []
    for i in range(6):
        u = _pairs(f"u{i}", 6, 2, 16, i)
        shift = torch.zeros(16)
        shift[i % 2] = 5.0  # two clearly different kinds of users
        u.emb_p += shift
        users.append(u)
    pairs, profiles = pairs_to_tables(users)
    reduced = reduce_all(pairs, profiles, cfg, layers=[3, 5])
    assert len(reduced.grouping.group_ids) == 2 and sum(reduced.grouping.sizes) == 6
    projection = EditConfig(form="projection")
    additive = EditConfig(form="additive", strength=0.2)
    direction, norms = reduced.group_steer
    for j in range(2):
        edit = reduced.group_edit(j, projection, "mlp")
        assert edit.form == "projection" and len(edit.layers) == 1 and set(edit.layers) <= {3, 5}
        assert torch.allclose(edit.theta_n.norm(dim=-1), torch.ones(1), atol=1e-4)
        steer = reduced.group_edit(j, additive, "mlp")
        slot = [3, 5].index(steer.layers[0])
        # strength × the layer's typical norm along the group's unit mean difference
        assert torch.allclose(steer.steer[0], 0.2 * norms[j, slot] * direction[j, slot], atol=1e-5)
        assert torch.allclose(steer.steer[0].norm(), 0.2 * norms[j, slot], rtol=1e-4)
    assert reduced.user_edit(0, projection, "mlp").theta_p.shape[-1] == 16
    # A calibrated edit uses the group's chosen layer and strength; strength 0 adds nothing.
    reduced.group_calibration = [choose({"base": 2.0, "5:0.1": 1.5}), choose({"base": 2.0, "3:0.3": 2.5})]
    first, second = reduced.group_edit(0, additive, "mlp"), reduced.group_edit(1, additive, "mlp")
    assert first.layers == [5] and torch.allclose(first.steer[0].norm(), 0.1 * norms[0, 1], rtol=1e-4)
    assert second.layers == [3] and float(second.steer.abs().max()) == 0.0


def test_style_grouping_puts_users_who_write_alike_together():
    cfg = ChameleonConfig().with_overrides(
        {
            "groups.n_groups": 2,
            "groups.min_group_size": 1,
            "groups.min_contributors": 1,
            "subspace.ccs_steps": 20,
            "subspace.ccs_restarts": 1,
        }
    )
    users = []
    for i in range(6):
        u = _pairs(f"u{i}", 4, 2, 16, i)
        texts = ["OMG YES!!! SO HYPED!!!"] if i % 2 else ["i went home and slept."]
        u.style_features = torch.from_numpy(history_style(texts)).float()
        users.append(u)
    pairs, profiles = pairs_to_tables(users)
    grouping = reduce_all(pairs, profiles, cfg, layers=[3, 5]).grouping
    labels = grouping.labels.tolist()
    assert (
        labels[0] == labels[2] == labels[4] and labels[1] == labels[3] == labels[5] and labels[0] != labels[1]
    )
    with pytest.raises(ValueError, match="style features"):
        for u in users:
            u.style_features = None
        reduce_all(*pairs_to_tables(users), cfg, layers=[3, 5])
