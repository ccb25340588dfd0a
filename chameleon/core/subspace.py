"""Align it: personalized subspaces (SVD) and non-personalized directions (CCS), batched.

Every function works on a batch of "units" at once (a unit is one user, or one group of pooled
users) and on all captured layers at once, so thousands of users reduce in one call:

    H_P, H_N : [U, K, L, d]   last-token hidden states of the personalized / neutral answers
    mask     : [U, K]         which of the K pair slots are real (users have different counts)

Shapes of the results use r = max_rank. All math runs in float32 on the tensors' device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from chameleon.config import SubspaceConfig

_EPS = 1e-6


@dataclass
class Subspaces:
    """Directions of U units at L layers."""

    theta_p: torch.Tensor
    """[U, L, r, d] unit personalized directions; rows past a unit's rank are zero."""
    rank: torch.Tensor
    """[U, L] number of personalized directions kept."""
    theta_n: torch.Tensor
    """[U, L, d] unit non-personalized direction, pointing from the personalized to the neutral side."""
    ccs_loss: torch.Tensor
    """[U, L] lowest CCS loss over restarts (NaN where θN is not from CCS); lower = cleaner contrast."""
    mean: torch.Tensor
    """[U, L, d] mean activation over both sides of the pairs (μ of the centered edit)."""
    n_pairs: torch.Tensor
    """[U] pairs the directions were computed from."""

    def select(self, index: torch.Tensor) -> Subspaces:
        """The units at `index` (a slice, index tensor or boolean mask over U)."""
        return Subspaces(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def cat(parts: Sequence[Subspaces]) -> Subspaces:
        """Units of several results, in order."""
        if not parts:
            raise ValueError("nothing to concatenate")
        return Subspaces(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Subspaces)))


# ---------------------------------------------------------------------------------------------
# Pair filtering


def pair_filter_mask(
    H_P: torch.Tensor, H_N: torch.Tensor, mask: torch.Tensor, cos_max: float, layer_index: int
) -> torch.Tensor:
    """Keep pairs whose two answers differ enough at one layer.

    Cosine is taken after removing the unit's mean activation (over both sides): last-token
    activations share a large common component, so raw cosines sit near 1 for every pair and a
    0.8 cut (AlignEZ's) would drop them all. Identical answers give identical activations and
    cosine 1, so they are dropped too.
    """
    m = mask.to(H_P.dtype)[..., None]
    p, n = H_P[:, :, layer_index], H_N[:, :, layer_index]
    count = (2 * m.sum(1, keepdim=True)).clamp_min(1)
    mu = ((p + n) * m).sum(1, keepdim=True) / count
    cos = torch.nn.functional.cosine_similarity(p - mu, n - mu, dim=-1, eps=_EPS)
    same = (p - n).abs().amax(-1) == 0
    return mask & (cos <= cos_max) & ~same


# ---------------------------------------------------------------------------------------------
# Masked statistics


def _masked_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of x [U, K, L, d] with weights w [U, K]."""
    w = w.to(x.dtype)
    return (x * w[:, :, None, None]).sum(1) / w.sum(1).clamp_min(1)[:, None, None]


def _orient(vecs: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Flip each vector [..., d] so that its dot product with ref [..., d] is >= 0."""
    sign = torch.where((vecs * ref).sum(-1, keepdim=True) < 0, -1.0, 1.0)
    return vecs * sign


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def _gram(M: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """M^T M [..., d, d] in float64, summed over blocks of `rows` rows: a group's pooled pairs
    (thousands of rows) are never copied whole to float64, the driver's largest transient."""
    out = None
    for start in range(0, M.shape[-2], rows):
        block = M[..., start : start + rows, :].double()
        part = block.transpose(-1, -2) @ block
        out = part if out is None else out.add_(part)
    return out


def thin_svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values S [..., k] (descending) and right singular vectors Vh [..., k, d] of a batch
    of matrices M [..., n, d], k = min(n, d).

    Through the eigendecomposition of the smaller Gram matrix (in float64): batched LAPACK SVD of
    thousands of 8 x 576 matrices costs milliseconds each on a CPU, an 8 x 8 (or d x d) eigh a
    fraction of that. Directions whose singular value is ~0 come back as zero rows.
    """
    n, d = M.shape[-2], M.shape[-1]
    if n <= d:
        M64 = M.double()
        evals, U = torch.linalg.eigh(M64 @ M64.transpose(-1, -2))  # ascending
        evals, U = evals.flip(-1).clamp_min(0), U.flip(-1)
        S = evals.sqrt()
        tol = S[..., :1] * 1e-7 + 1e-30
        Vh = (U.transpose(-1, -2) @ M64) / torch.where(S > tol, S, torch.inf)[..., None]
    else:
        evals, V = torch.linalg.eigh(_gram(M))
        evals, V = evals.flip(-1).clamp_min(0), V.flip(-1)
        S = evals.sqrt()
        Vh = V.transpose(-1, -2)
    return S.to(M.dtype), Vh.to(M.dtype)


# ---------------------------------------------------------------------------------------------
# θP: the personalized subspace


def personalized_subspace(
    H_P: torch.Tensor,
    H_N: torch.Tensor,
    mask: torch.Tensor,
    method: str = "svd",
    variance_threshold: float = 0.9,
    max_rank: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (theta_p [U, L, r, d], rank [U, L]).

    `svd` centers H^P before the SVD: an uncentered SVD returns the mean-activation direction
    rather than how personalized answers vary. `svd_diff` uses the pair differences H^P - H^N.
    Directions are oriented toward the personalized side (sign is irrelevant to the edit, but
    a fixed sign makes artifacts comparable and groupable).
    """
    U, K, L, d = H_P.shape
    w = mask.to(H_P.dtype)
    contrast = _masked_mean(H_P, mask) - _masked_mean(H_N, mask)  # [U, L, d]
    if method == "mean_diff":
        theta = _unit(contrast)[:, :, None, :]
        rank = torch.ones(U, L, dtype=torch.long, device=H_P.device)
        out = torch.zeros(U, L, max_rank, d, dtype=H_P.dtype, device=H_P.device)
        out[:, :, :1] = theta
        return out, rank
    if method == "svd":
        M = H_P - _masked_mean(H_P, mask)[:, None]
    elif method == "svd_diff":
        M = H_P - H_N
    else:
        raise ValueError(f"unknown theta_p method {method!r}")
    M = M.mul_(w[:, :, None, None]).permute(0, 2, 1, 3)  # [U, L, K, d]; padded pairs are zero rows
    S, Vh = thin_svd(M)  # S [U, L, k], Vh [U, L, k, d]
    var = S.square()
    share = var.cumsum(-1) / var.sum(-1, keepdim=True).clamp_min(_EPS)
    rank = (share < variance_threshold).sum(-1) + 1
    rank = rank.clamp(max=max_rank).clamp(max=Vh.shape[-2])
    rank = torch.where(var[..., 0] > _EPS, rank, torch.zeros_like(rank))
    r = min(max_rank, Vh.shape[-2])
    theta = _orient(Vh[:, :, :r], contrast[:, :, None, :])
    keep = torch.arange(r, device=H_P.device)[None, None, :] < rank[..., None]
    theta = theta * keep[..., None]
    out = torch.zeros(U, L, max_rank, d, dtype=H_P.dtype, device=H_P.device)
    out[:, :, :r] = theta
    return out, rank


# ---------------------------------------------------------------------------------------------
# θN: Contrast-Consistent Search


def ccs_loss_fn(p_pos: torch.Tensor, p_neg: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Burns et al. (2022): consistency (p+ - (1 - p-))^2 plus confidence min(p+, p-)^2, averaged
    over real pairs (weights w, same leading shape as p)."""
    per_pair = (p_pos - (1 - p_neg)).square() + torch.minimum(p_pos, p_neg).square()
    return (per_pair * w).sum(-1) / w.sum(-1).clamp_min(1)


def ccs_loss_and_grad(
    params: torch.Tensor, zp: torch.Tensor, zn: torch.Tensor, pair_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CCS loss [..., R] of probes params [..., R, m+1] (weights, bias) on pairs zp, zn [..., K, m],
    and its gradient, written out by hand: this is the reduce stage's hot loop, and skipping the
    autograd graph halves its cost. pair_mask [..., 1, K] marks real pairs (loss = their mean)."""
    m = zp.shape[-1]
    wv, b = params[..., :m], params[..., m:]
    # Saturated logits beyond ±30 change nothing but would make sigmoid return denormal floats,
    # which are two orders of magnitude slower on CPUs.
    p_pos = torch.sigmoid((torch.einsum("...km,...rm->...rk", zp, wv) + b).clamp(-30, 30))
    p_neg = torch.sigmoid((torch.einsum("...km,...rm->...rk", zn, wv) + b).clamp(-30, 30))
    loss = ccs_loss_fn(p_pos, p_neg, pair_mask)
    weight = pair_mask / pair_mask.sum(-1, keepdim=True).clamp_min(1)
    consist = p_pos + p_neg - 1
    lower = torch.minimum(p_pos, p_neg)
    pos_is_min = p_pos < p_neg
    g_pos = 2 * (consist + torch.where(pos_is_min, lower, 0.0)) * p_pos * (1 - p_pos) * weight
    g_neg = 2 * (consist + torch.where(pos_is_min, 0.0, lower)) * p_neg * (1 - p_neg) * weight
    grad_w = torch.einsum("...rk,...km->...rm", g_pos, zp) + torch.einsum("...rk,...km->...rm", g_neg, zn)
    return loss, torch.cat([grad_w, (g_pos + g_neg).sum(-1, keepdim=True)], -1)


def ccs_direction(
    H_P: torch.Tensor,
    H_N: torch.Tensor,
    mask: torch.Tensor,
    restarts: int = 10,
    steps: int = 1000,
    lr: float = 1.0,
    weight_decay: float = 0.01,
    seed: int = 0,
    tol: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (theta_n [U, L, d], loss [U, L]) from CCS on every unit, layer and restart at once.

    Each side is normalized on its own, as in Burns et al.: its mean is removed and it is divided
    by its overall standard deviation (one scalar per side; rows end up with unit RMS norm). A
    per-dimension division (Burns's optional `var_normalize`) would make the probe's weight a
    reading direction skewed by per-dimension scales instead of a direction of activation space,
    which is what the edit needs.

    The probe is trained by full-batch gradient descent with momentum in the span of the unit's
    normalized activations (at most 2K dimensions). Gradient descent is rotation-invariant and
    the loss sees a probe only through that span, so this is exactly training in activation
    space, at 2K instead of d dimensions, the same cost for one unit or ten thousand. (Adam's
    per-coordinate steps are not rotation-invariant: with few pairs they spread the probe over
    every low-variance direction of the span and bury the contrast direction; seen on planted
    data, tests/test_subspace.py.) All restarts use the same initial probes (in span
    coordinates) for every unit, so a unit's result does not depend on which other units share
    the batch: a unit's probes stop moving once none of its losses changed by more than `tol` over
    50 steps, and the loop ends when every unit has stopped. The best restart's probe maps back through the span basis and is oriented toward
    the neutral side.
    """
    U, K, L, d = H_P.shape
    wt = mask.to(H_P.dtype)
    mp, mn = _masked_mean(H_P, mask), _masked_mean(H_N, mask)
    # One scalar per side and layer: the RMS norm of the centered rows.
    sp = _masked_mean((H_P - mp[:, None]).square(), mask).sum(-1, keepdim=True).sqrt().clamp_min(_EPS)
    sn = _masked_mean((H_N - mn[:, None]).square(), mask).sum(-1, keepdim=True).sqrt().clamp_min(_EPS)
    # Both normalized sides written in place into one buffer: a group's pool of pairs is the
    # driver's largest tensor, so no temporary copies of it.
    X = H_P.new_empty(U, 2 * K, L, d)
    for side, H, m_, s_ in ((X[:, :K], H_P, mp, sp), (X[:, K:], H_N, mn, sn)):
        torch.sub(H, m_[:, None], out=side).div_(s_[:, None]).mul_(wt[:, :, None, None])
    X = X.permute(0, 2, 1, 3)  # [U, L, 2K, d]
    # Orthonormal basis of the span: right singular vectors with non-negligible singular values.
    S, Vh = thin_svd(X)  # Vh [U, L, m, d], m = min(2K, d)
    basis = Vh * (S > S[..., :1] * 1e-5)[..., None]
    zp = torch.einsum("ulkd,ulmd->ulkm", X[:, :, :K], basis)  # [U, L, K, m]
    zn = torch.einsum("ulkd,ulmd->ulkm", X[:, :, K:], basis)
    del X
    m = basis.shape[-2]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Drawn at full width and cut to m, so padding a unit (which changes m) never changes its init.
    # Scale of torch.nn.Linear's default init on d inputs (Burns et al.'s probe): small next to the
    # learned weights, so the directions training leaves alone add little to the result.
    w_full = (torch.rand(restarts, d + 1, generator=gen) * 2 - 1) / d**0.5
    w0 = torch.cat([w_full[:, :m], w_full[:, d:]], 1)
    params = w0.to(H_P.device, H_P.dtype).expand(U, L, restarts, m + 1).clone()
    velocity = torch.zeros_like(params)
    pair_mask = wt[:, None, None, :]  # [U, 1, 1, K]
    # Update rule = torch.optim.SGD(momentum=0.9, weight_decay) on every problem at once.
    last = None
    # A unit stops at its own convergence step (its probes are frozen from then on), so its result
    # does not depend on which other units share the batch: a refresh that maps a few users alone
    # gets the directions a full run gets for them.
    active = torch.ones(U, 1, 1, 1, dtype=H_P.dtype, device=H_P.device)
    for step in range(steps):
        loss, grad = ccs_loss_and_grad(params, zp, zn, pair_mask)
        grad += weight_decay * params
        velocity = grad if step == 0 else velocity.mul_(0.9).add_(grad)
        params -= lr * velocity * active
        # Gradient descent converges in a few hundred steps; stop once no problem moves.
        if step % 50 == 49:
            if last is not None:
                moving = (loss - last).abs().amax(dim=(1, 2)) >= tol
                active *= moving.to(active.dtype)[:, None, None, None]
                if not moving.any():
                    break
            last = loss
    losses, _ = ccs_loss_and_grad(params, zp, zn, pair_mask)  # [U, L, R]
    best_loss, best = losses.min(-1)
    w_best = torch.gather(params[..., :m], 2, best[..., None, None].expand(U, L, 1, m))[:, :, 0]
    w_act = torch.einsum("ulm,ulmd->uld", w_best, basis)
    theta_n = _orient(_unit(w_act), mn - mp)
    return theta_n, best_loss


# ---------------------------------------------------------------------------------------------
# Everything for a batch of units


def fit_subspaces(H_P: torch.Tensor, H_N: torch.Tensor, mask: torch.Tensor, cfg: SubspaceConfig) -> Subspaces:
    """θP, θN, CCS loss and μ for U units at every captured layer (inputs in any float dtype)."""
    H_P, H_N = H_P.float(), H_N.float()
    mask = mask.bool()
    theta_p, rank = personalized_subspace(H_P, H_N, mask, cfg.theta_p, cfg.variance_threshold, cfg.max_rank)
    if cfg.theta_n == "ccs":
        theta_n, loss = ccs_direction(
            H_P, H_N, mask, cfg.ccs_restarts, cfg.ccs_steps, cfg.ccs_lr, cfg.ccs_weight_decay, cfg.seed
        )
    elif cfg.theta_n == "mean_diff":
        theta_n = _unit(_masked_mean(H_N, mask) - _masked_mean(H_P, mask))
        loss = torch.full(theta_n.shape[:2], float("nan"), device=H_P.device)
    else:
        raise ValueError(f"unknown theta_n method {cfg.theta_n!r}")
    mean = 0.5 * (_masked_mean(H_P, mask) + _masked_mean(H_N, mask))
    return Subspaces(theta_p, rank, theta_n, loss, mean, mask.sum(1))


def choose_layers(
    sub: Subspaces, captured_layers: list[int], n_layers: int, explicit: list[int] | None = None
) -> torch.Tensor:
    """[U, n] indices into `captured_layers` of the layers to edit: the explicit list, else the n
    layers with the lowest CCS loss (ties and NaN losses fall back to the captured order)."""
    U, L = sub.ccs_loss.shape
    if explicit is not None:
        missing = [layer for layer in explicit if layer not in captured_layers]
        if missing:
            raise ValueError(f"layers {missing} were not captured (captured: {captured_layers})")
        idx = torch.tensor([captured_layers.index(layer) for layer in explicit])
        return idx.expand(U, len(idx)).clone()
    n = min(n_layers, L)
    loss = torch.nan_to_num(sub.ccs_loss, nan=0.0)
    # Stable order: the layer position breaks ties, so mean-diff (no loss) keeps the first n.
    key = loss * 1e6 + torch.arange(L, dtype=loss.dtype, device=loss.device) * 1e-6
    return key.argsort(-1)[:, :n].sort(-1).values


# ---------------------------------------------------------------------------------------------
# Pooling pairs of many users into group units


def group_pair_rows(
    mask: torch.Tensor,
    group_index: torch.Tensor,
    n_groups: int,
    max_pairs: int | None = None,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Per group, the flat indices (u * K + k) of the pairs it pools: the real pairs of every
    member (group_index [U], -1 = in no group), or a seeded random subset of `max_pairs` of them.
    The owners of a group's pairs (`rows // K`) are the users who contribute to its edit."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for g in range(n_groups):
        idx = torch.nonzero(((group_index == g)[:, None] & mask).flatten()).flatten()
        if max_pairs is not None and len(idx) > max_pairs:
            idx = idx[torch.randperm(len(idx), generator=gen)[:max_pairs].sort().values]
        out.append(idx)
    return out


def pool_groups(
    H_P: torch.Tensor,
    H_N: torch.Tensor,
    mask: torch.Tensor,
    group_index: torch.Tensor,
    n_groups: int,
    max_pairs: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack the real pairs of every member of each group into one unit per group.

    group_index [U] (values in 0..n_groups-1; -1 = in no group). Groups with more than
    `max_pairs` pairs keep a seeded random subset (`group_pair_rows`), so a group's reduce costs
    the same at any size. Returns H_P, H_N [G, Kmax, L, d] and mask [G, Kmax].
    """
    U, K, L, d = H_P.shape
    rows = group_pair_rows(mask, group_index, n_groups, max_pairs, seed)
    rows_p = [H_P.reshape(U * K, L, d)[idx] for idx in rows]
    rows_n = [H_N.reshape(U * K, L, d)[idx] for idx in rows]
    kmax = max([r.shape[0] for r in rows_p] + [1])
    out_p = H_P.new_zeros(n_groups, kmax, L, d)
    out_n = H_N.new_zeros(n_groups, kmax, L, d)
    out_m = torch.zeros(n_groups, kmax, dtype=torch.bool, device=mask.device)
    for g, (rp, rn) in enumerate(zip(rows_p, rows_n, strict=True)):
        out_p[g, : rp.shape[0]] = rp
        out_n[g, : rn.shape[0]] = rn
        out_m[g, : rp.shape[0]] = True
    return out_p, out_n, out_m


def steering_directions(
    H_P: torch.Tensor, H_N: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive forms' direction and scale of every unit at every layer.

    Returns the unit mean difference personalized − neutral [U, L, d] (StyleVector's contrast:
    from the model's own answers toward the users' real ones) and the typical state norm [U, L]
    (mean ‖h‖ over both sides of the real pairs), so a strength can be given relative to it.
    """
    direction = _unit(_masked_mean(H_P, mask) - _masked_mean(H_N, mask))
    w = mask.to(H_P.dtype)
    norms = (H_P.norm(dim=-1) + H_N.norm(dim=-1)) / 2  # [U, K, L]
    typical = (norms * w[:, :, None]).sum(1) / w.sum(1).clamp_min(1)[:, None]
    return direction, typical


# ---------------------------------------------------------------------------------------------
# Grouping users by subspace similarity


def grouping_features(sub: Subspaces) -> torch.Tensor:
    """[U, F] features whose cosine compares two users' subspaces at every captured layer.

    Both θP (oriented to the personalized side) and θN (oriented to the neutral side) carry a
    meaningful sign, so plain concatenation is sign-consistent. Every block is a unit vector, so
    each layer counts equally.
    """
    U = sub.theta_p.shape[0]
    top_p = sub.theta_p[:, :, 0]  # [U, L, d]
    feats = torch.cat([top_p, sub.theta_n], -1).reshape(U, -1)
    return _unit(feats)


def spherical_kmeans(
    x: torch.Tensor, k: int, seed: int = 0, iters: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster unit rows of x [N, F] by cosine; k-means++ seeding. Returns (labels [N], centroids [k, F])."""
    n = x.shape[0]
    k = max(1, min(k, n))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    dist = 1 - x @ x[first]
    for _ in range(1, k):
        probs = dist.clamp_min(0).cpu()
        nxt = (
            int(torch.multinomial(probs, 1, generator=gen))
            if probs.sum() > 0
            else int(torch.randint(n, (1,), generator=gen))
        )
        centers.append(x[nxt])
        dist = torch.minimum(dist, 1 - x @ x[nxt])
    cent = torch.stack(centers)
    labels = torch.full((n,), -1, dtype=torch.long, device=x.device)
    for _ in range(iters):
        new = (x @ cent.T).argmax(1)
        if torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                cent[j] = _unit(members.sum(0))
    return labels, cent


def cluster_users(
    features: torch.Tensor, n_groups: int, min_group_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups of at least `min_group_size` users (when there are that many users).

    Returns (labels [U] in 0..G-1, centroids [G, F], distance [U] = 1 - cosine to own centroid).
    Clusters smaller than the minimum are dissolved into the nearest remaining cluster, smallest
    first, so every group edit is pooled over enough users.
    """
    U = features.shape[0]
    k = max(1, min(n_groups, U // max(1, min_group_size)))
    labels, cent = spherical_kmeans(features, k, seed)
    while True:
        sizes = torch.bincount(labels, minlength=cent.shape[0])
        small = [(int(s), j) for j, s in enumerate(sizes.tolist()) if s < min_group_size]
        if not small or cent.shape[0] == 1:
            break
        _, j = min(small)
        keep = [i for i in range(cent.shape[0]) if i != j]
        cent = cent[keep]
        remap = torch.full((len(sizes),), -1, dtype=torch.long, device=labels.device)
        remap[keep] = torch.arange(len(keep), device=labels.device)
        moved = labels == j
        labels = remap[labels.clamp_min(0)]
        labels[moved] = (features[moved] @ cent.T).argmax(1)
        for g in range(cent.shape[0]):
            members = features[labels == g]
            if len(members):
                cent[g] = _unit(members.sum(0))
    dist = 1 - (features * cent[labels]).sum(-1)
    return labels, cent, dist


def nearest_group(embedding: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign rows of embedding [N, F] to the nearest of centroids [G, F] by cosine.

    Returns (group index [N], distance = 1 - cosine [N]).
    """
    sims = _unit(embedding.float()) @ _unit(centroids.float()).T
    best, idx = sims.max(1)
    return idx, 1 - best
