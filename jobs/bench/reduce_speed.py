"""Speed of the reduce stage: θP, θN (CCS), layer choice for many users at once.

    python jobs/bench/reduce_speed.py [--users 10000] [--pairs 8] [--layers 3] [--hidden 576]
                                      [--loop-sample 40] [--smoke] [--out FILE]

Synthetic hidden states with the shape of the default job (8 pairs, 3 captured layers, SmolLM2's
hidden size 576) and the default subspace config (CCS: 10 restarts x 1000 steps). The
vectorized reduce (`reduce.reduce_users`) runs on all users; the per-user loop runs the same
function one user at a time on a sample and is extrapolated (`vectorized_speedup` = loop time
per user x users / vectorized time). Grouping (on random stylometric features, as the default
`groups.features: style` clusters the features the map stage records) and group subspaces are
timed as well.
"""

from __future__ import annotations

import time

import torch
from common import parse, parser, report

from chameleon.config import ChameleonConfig
from chameleon.core.style import FEATURES
from chameleon.job.grouping import group_users
from chameleon.job.reduce import reduce_groups, reduce_users
from chameleon.job.tables import UnitData

SMOKE = {
    "users": 64,
    "pairs": 4,
    "layers": 2,
    "hidden": 32,
    "loop_sample": 4,
    "ccs_steps": 20,
    "ccs_restarts": 2,
}


def synthetic_units(U: int, K: int, L: int, d: int, seed: int = 0) -> UnitData:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 1, L, d, generator=g)
    style = torch.randn(U, 1, L, d, generator=g)
    H_P = base + 0.5 * style + torch.randn(U, K, L, d, generator=g)
    H_N = base + torch.randn(U, K, L, d, generator=g)
    return UnitData(
        user_ids=[f"user-{i:06d}" for i in range(U)],
        group_ids=[None] * U,
        H_P=H_P,
        H_N=H_N,
        mask=torch.ones(U, K, dtype=torch.bool),
        history_embedding=torch.randn(U, d, generator=g),
        style_features=torch.rand(U, len(FEATURES), generator=g),
    )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--loop-sample", type=int, default=40)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--ccs-steps", type=int, help="CCS steps per restart (default: the config's)")
    p.add_argument("--ccs-restarts", type=int, help="CCS restarts (default: the config's)")
    args = parse(p, SMOKE)
    if args.threads:
        # On a shared or small machine, one thread avoids OpenMP waits on these small ops.
        torch.set_num_threads(args.threads)
    cfg = ChameleonConfig().with_overrides(
        {"subspace.ccs_steps": args.ccs_steps, "subspace.ccs_restarts": args.ccs_restarts}
    )
    layers = list(range(args.layers))
    data = synthetic_units(args.users, args.pairs, args.layers, args.hidden)

    t0 = time.perf_counter()
    red = reduce_users(data, cfg.subspace, layers)
    t_users = time.perf_counter() - t0

    t1 = time.perf_counter()
    grouping = group_users(data, red, cfg)
    reduce_groups(data, red, grouping, cfg.subspace, layers)  # subspaces, layers and pooled pairs
    t_groups = time.perf_counter() - t1

    n = min(args.loop_sample, args.users)
    sample = synthetic_units(n, args.pairs, args.layers, args.hidden, seed=1)
    t2 = time.perf_counter()
    for i in range(n):
        one = UnitData(
            sample.user_ids[i : i + 1],
            [None],
            sample.H_P[i : i + 1],
            sample.H_N[i : i + 1],
            sample.mask[i : i + 1],
            sample.history_embedding[i : i + 1],
            sample.style_features[i : i + 1],
        )
        reduce_users(one, cfg.subspace, layers)
    loop_per_user = (time.perf_counter() - t2) / n

    figures = {
        "torch_threads": torch.get_num_threads(),
        "users": args.users,
        "pairs_per_user": args.pairs,
        "layers": args.layers,
        "hidden": args.hidden,
        "ccs_restarts_x_steps": f"{cfg.subspace.ccs_restarts}x{cfg.subspace.ccs_steps}",
        "reduce_users_s": t_users,
        "group_and_group_reduce_s": t_groups,
        "groups": len(grouping.group_ids),
        "loop_s_per_user": loop_per_user,
        "vectorized_speedup": loop_per_user * args.users / t_users,
        "reduce_users_per_s": args.users / t_users,
    }
    report(figures, "reduce_users_per_s", args.out)


if __name__ == "__main__":
    main()
