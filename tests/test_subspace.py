"""θP (SVD), θN (CCS), layer choice, grouping: recovered from planted structure."""

from __future__ import annotations

import pytest
import torch

from chameleon.config import SubspaceConfig
from chameleon.core import subspace as ss

D = 48


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def planted(n_units: int, K: int = 16, L: int = 2, seed: int = 0, noise: float = 0.05):
    """Pairs with a personalized direction p and a neutral direction n.

    Personalized answers spread widely along p (neutral ones less), so p is the top direction of
    centered H^P. Neutral answers sit further along n, and each pair's contrast along n flips
    with a random z (the structure CCS looks for: within a pair, the two sides are opposite).
    Returns H_P, H_N [U, K, L, D], p [U, D], n [U, D].
    """
    g = torch.Generator().manual_seed(seed)
    p = torch.stack([_unit(torch.randn(D, generator=g)) for _ in range(n_units)])
    n = torch.randn(n_units, D, generator=g)
    n = n - (n * p).sum(-1, keepdim=True) * p  # orthogonal to p, so both are identifiable
    n = n / n.norm(dim=-1, keepdim=True)
    mu = 5 * torch.randn(n_units, 1, 1, D, generator=g)
    a = 4 * torch.randn(n_units, K, 1, 1, generator=g)
    b = 3 * torch.randn(n_units, K, 1, 1, generator=g)
    z = torch.randint(0, 2, (n_units, K, 1, 1), generator=g).float() * 2 - 1
    P, N = p[:, None, None], n[:, None, None]
    H_P = mu + a * P + 2 * z * N + noise * torch.randn(n_units, K, L, D, generator=g)
    H_N = mu + b * P + (3.0 - 2 * z) * N + noise * torch.randn(n_units, K, L, D, generator=g)
    return H_P, H_N, p, n


def test_svd_recovers_planted_personalized_direction():
    H_P, H_N, p, _ = planted(4)
    mask = torch.ones(4, 16, dtype=torch.bool)
    theta, rank = ss.personalized_subspace(H_P, H_N, mask, "svd", 0.9, 3)
    cos = (theta[:, :, 0] * p[:, None]).sum(-1)
    assert cos.abs().min() >= 0.95, cos
    assert (rank >= 1).all()
    assert torch.allclose(theta[:, :, 0].norm(dim=-1), torch.ones(4, 2), atol=1e-5)


def test_uncentered_svd_would_return_the_mean_direction():
    # Why the default centers: the same data without centering points at the mean activation.
    H_P, _, p, _ = planted(2)
    M = H_P[:, :, 0]
    _, _, Vh = torch.linalg.svd(M, full_matrices=False)
    assert ((Vh[:, 0] * p).sum(-1).abs() < 0.95).all()


def test_ccs_recovers_planted_neutral_direction_with_sign():
    H_P, H_N, _, n = planted(3, seed=1)
    mask = torch.ones(3, 16, dtype=torch.bool)
    theta_n, loss = ss.ccs_direction(H_P, H_N, mask, restarts=5, steps=300)
    cos = (theta_n * n[:, None]).sum(-1)
    assert cos.min() >= 0.95, cos  # sign: points toward the neutral side
    assert torch.isfinite(loss).all() and (loss < 0.2).all()


def test_ccs_sign_follows_the_neutral_side():
    H_P, H_N, _, n = planted(2, seed=2)
    mask = torch.ones(2, 16, dtype=torch.bool)
    theta_swapped, _ = ss.ccs_direction(H_N, H_P, mask, restarts=5, steps=300)
    assert ((theta_swapped * n[:, None]).sum(-1) <= -0.95).all()


def test_vectorized_ccs_equals_per_user_loop():
    H_P, H_N, _, _ = planted(5, K=8, seed=3)
    mask = torch.ones(5, 8, dtype=torch.bool)
    mask[1, 6:] = False  # users with different numbers of pairs share one batch
    mask[3, 5:] = False
    together, loss_t = ss.ccs_direction(H_P, H_N, mask, restarts=4, steps=200)
    for u in range(5):
        alone, loss_a = ss.ccs_direction(
            H_P[u : u + 1], H_N[u : u + 1], mask[u : u + 1], restarts=4, steps=200
        )
        assert torch.allclose(together[u], alone[0], atol=1e-4), u
        assert torch.allclose(loss_t[u], loss_a[0], atol=1e-5), u


def test_padding_pairs_do_not_change_a_user():
    H_P, H_N, _, _ = planted(1, K=8, seed=4)
    mask = torch.ones(1, 8, dtype=torch.bool)
    pad_p = torch.cat([H_P, 100 * torch.randn(1, 4, 2, D)], 1)
    pad_n = torch.cat([H_N, 100 * torch.randn(1, 4, 2, D)], 1)
    pad_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)], 1)
    cfg = SubspaceConfig(ccs_steps=100, ccs_restarts=3)
    a = ss.fit_subspaces(H_P, H_N, mask, cfg)
    b = ss.fit_subspaces(pad_p, pad_n, pad_mask, cfg)
    assert torch.allclose(a.theta_p, b.theta_p, atol=1e-4)
    # CCS runs 1000 gradient steps: equal up to float rounding, not bit for bit.
    assert ((a.theta_n * b.theta_n).sum(-1) > 0.9999).all()
    assert torch.allclose(a.mean, b.mean, atol=1e-4)


def test_mean_diff_options():
    H_P, H_N, _, n = planted(2, K=64, seed=5)
    mask = torch.ones(2, 64, dtype=torch.bool)
    cfg = SubspaceConfig(theta_p="mean_diff", theta_n="mean_diff")
    sub = ss.fit_subspaces(H_P, H_N, mask, cfg)
    assert ((sub.theta_n * n[:, None]).sum(-1) >= 0.95).all()
    assert (sub.rank == 1).all()
    assert torch.isnan(sub.ccs_loss).all()
    # θP from mean difference points to the personalized side (opposite of θN here).
    assert ((sub.theta_p[:, :, 0] * sub.theta_n).sum(-1) <= -0.95).all()


def test_rank_follows_explained_variance_and_cap():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, 3, generator=g))[0].T  # 3 orthonormal directions
    coef = torch.randn(1, 40, 1, 3, generator=g) * torch.tensor([5.0, 4.0, 3.0])
    H_P = coef @ basis + 0.01 * torch.randn(1, 40, 1, D, generator=g)
    H_N = torch.zeros_like(H_P)
    mask = torch.ones(1, 40, dtype=torch.bool)
    _, rank = ss.personalized_subspace(H_P, H_N, mask, "svd", 0.9, 5)
    assert rank.item() == 3
    _, rank = ss.personalized_subspace(H_P, H_N, mask, "svd", 0.9, 2)
    assert rank.item() == 2
    _, rank = ss.personalized_subspace(H_P, H_N, mask, "svd", 0.5, 5)
    assert rank.item() == 1


def test_pair_filter_drops_identical_and_near_duplicate_pairs():
    H_P, H_N, _, _ = planted(1, K=6, seed=6)
    H_N[0, 0] = H_P[0, 0]  # identical answers
    H_N[0, 1] = H_P[0, 1] + 1e-4  # nearly identical
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[0, 5] = False
    keep = ss.pair_filter_mask(H_P, H_N, mask, 0.8, 0)
    assert not keep[0, 0] and not keep[0, 1] and not keep[0, 5]
    assert keep[0, 2:5].all()


def test_choose_layers_lowest_ccs_loss_and_explicit():
    sub = ss.Subspaces(
        theta_p=torch.zeros(2, 4, 1, D),
        rank=torch.ones(2, 4, dtype=torch.long),
        theta_n=torch.zeros(2, 4, D),
        ccs_loss=torch.tensor([[0.3, 0.1, 0.2, 0.4], [0.05, 0.5, 0.5, 0.01]]),
        mean=torch.zeros(2, 4, D),
        n_pairs=torch.tensor([4, 4]),
    )
    assert ss.choose_layers(sub, [3, 5, 7, 9], 2).tolist() == [[1, 2], [0, 3]]
    assert ss.choose_layers(sub, [3, 5, 7, 9], 2, explicit=[9, 3]).tolist() == [[3, 0], [3, 0]]
    with pytest.raises(ValueError, match="not captured"):
        ss.choose_layers(sub, [3, 5, 7, 9], 2, explicit=[4])


def test_clustering_finds_planted_groups_and_respects_min_size():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 32, generator=g)
    labels_true = torch.arange(30) % 3
    x = centers[labels_true] + 0.1 * torch.randn(30, 32, generator=g)
    x = x / x.norm(dim=-1, keepdim=True)
    labels, cent, dist = ss.cluster_users(x, 3, 2, seed=0)
    # Same partition up to renaming.
    for j in range(3):
        assert len(set(labels[labels_true == j].tolist())) == 1
    assert len(set(labels.tolist())) == 3
    assert (dist < 0.1).all()
    # Asking for more groups than the minimum size allows merges small clusters away.
    labels, cent, _ = ss.cluster_users(x, 10, 8, seed=0)
    sizes = torch.bincount(labels)
    assert sizes.min() >= 8 and cent.shape[0] == len(sizes)


def test_pool_groups_and_nearest_group():
    H_P, H_N, _, _ = planted(3, K=4, seed=7)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 3] = False
    P, N, M = ss.pool_groups(H_P, H_N, mask, torch.tensor([0, 1, 0]), 2)
    assert M.sum(1).tolist() == [7, 4]
    assert torch.equal(P[0, :4], H_P[0]) and torch.equal(P[0, 4:7], H_P[2, :3])
    idx, dist = ss.nearest_group(
        torch.tensor([[1.0, 0.1], [-0.1, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    )
    assert idx.tolist() == [0, 1] and (dist < 0.01).all()


def test_hand_written_ccs_gradient_matches_autograd():
    g = torch.Generator().manual_seed(9)
    zp, zn = torch.randn(2, 3, 6, 5, generator=g), torch.randn(2, 3, 6, 5, generator=g)
    mask = torch.ones(2, 1, 1, 6)
    mask[1, ..., 4:] = 0
    params = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    loss, grad = ss.ccs_loss_and_grad(params, zp.double(), zn.double(), mask.double())
    loss.sum().backward()
    assert torch.allclose(grad, params.grad, atol=1e-10)


def test_pool_groups_caps_pairs_per_group_reproducibly():
    H_P, H_N, _, _ = planted(6, K=4, seed=8)
    mask = torch.ones(6, 4, dtype=torch.bool)
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    P1, _, M1 = ss.pool_groups(H_P, H_N, mask, labels, 2, max_pairs=10, seed=3)
    P2, _, M2 = ss.pool_groups(H_P, H_N, mask, labels, 2, max_pairs=10, seed=3)
    assert M1.sum(1).tolist() == [10, 8] and torch.equal(P1, P2) and torch.equal(M1, M2)
