"""The job's reduce, one partition at a time: the driver never holds every user's pair vectors.

`reduce.reduce_all` takes every partition's pairs at once: dense [U, K, L, d] tensors, about
0.6 MB per user at 8 pairs, 6 layers and hidden size 1,536 (6 GB for 10,000 users, before copies).
`reduce_partitions` computes the same thing in two passes over the stored partitions:

1. each partition's users are reduced on their own (θP, θN, μ, CCS loss, layer choice, steering
   direction; `reduce.reduce_users`) where the pairs are made: the map stage stores the results
   with the partition's profiles (`tables.attach_user_reduce`), so the driver reads only these
   (a partition without them, or made under other subspace settings, is reduced here from its
   pairs); only the per-user results are kept;
2. after grouping (`grouping.group_users`, on the per-user results), the pairs each group pools
   (at most `subspace.max_group_pairs` per group, the very sample `reduce_all` takes) are read
   back from their partitions, and nothing else.

The driver then holds per-user directions (no pair vectors), one partition and the groups'
capped samples. Users come out sorted by id, as from `reduce_all`; pairs, grouping, pooled
sample and group edits are the same. Per-user CCS runs per partition instead of per 2,048 users;
each user's probe stops at its own convergence step, so only the floating-point sums of batched
kernels can make losses and directions differ from `reduce_all`'s, in the last digits.

Partitions are read `job.read_threads` at a time, in order (`data.parallel_reads`): an object
store's latency per GET, not its bandwidth, sets the pace of thousands of small reads.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from chameleon.config import ChameleonConfig
from chameleon.core import subspace as ss
from chameleon.data.artifacts import VerifiedFiles
from chameleon.data.layout import column_matrix, part_keys
from chameleon.data.parallel_reads import read_in_order
from chameleon.job.reduce import Reduced, group_and_reduce, reduce_users
from chameleon.job.refresh import RECORD_DIGEST
from chameleon.job.tables import (
    UnitData,
    UserReduce,
    reduce_subspace_config,
    stored_user_reduce,
    tables_to_units,
    without_user_reduce,
)


def _pad_k(x: torch.Tensor, K: int) -> torch.Tensor:
    """[u, k] boolean pair slots padded with False to [u, K]."""
    return torch.cat([x, x.new_zeros(x.shape[0], K - x.shape[1])], 1) if x.shape[1] < K else x


def _rows_in_order(pieces: list[torch.Tensor], order: torch.Tensor) -> torch.Tensor:
    """`torch.cat(pieces)[order]`, each piece copied once straight to its sorted rows: the
    concatenation is never materialized next to its sorted copy (both grow with users)."""
    dest = torch.empty_like(order)
    dest[order] = torch.arange(len(order))
    out = pieces[0].new_empty(len(order), *pieces[0].shape[1:])
    start = 0
    for piece in pieces:
        out[dest[start : start + len(piece)]] = piece
        start += len(piece)
    return out


def _fields(data: UnitData, red: UserReduce, K: int) -> dict[str, torch.Tensor]:
    """A partition's per-user tensors by name (pair slots padded to K)."""
    out = {f"sub.{f.name}": getattr(red.sub, f.name) for f in dataclasses.fields(ss.Subspaces)}
    out.update(
        hist=data.history_embedding,
        mask=_pad_k(data.mask, K),
        keep=_pad_k(red.keep, K),
        chosen=red.chosen,
        has_edit=red.has_edit,
        steer=red.steer[0],
        steer_norm=red.steer[1],
    )
    if data.style_features is not None:
        out["style"] = data.style_features
    return out


def _concat(parts: list[tuple[UnitData, UserReduce]], order: torch.Tensor) -> tuple[UnitData, UserReduce]:
    """One UnitData (without pair vectors) and UserReduce over every partition, rows in `order`.

    Empties `parts`: each field's partition pieces are freed once their sorted copy exists, so
    the partitions' results are never all held next to their concatenation."""
    K = max(d.mask.shape[1] for d, _ in parts)
    ids = [u for d, _ in parts for u in d.user_ids]
    groups = [g for d, _ in parts for g in d.group_ids]
    pieces = [_fields(d, r, K) for d, r in parts]
    parts.clear()

    def rows(name: str) -> torch.Tensor:
        return _rows_in_order([p.pop(name) for p in pieces], order)

    style = rows("style") if all("style" in p for p in pieces) else None
    o = order.tolist()
    data = UnitData(
        [ids[i] for i in o], [groups[i] for i in o], None, None, rows("mask"), rows("hist"), style
    )
    sub = ss.Subspaces(*(rows(f"sub.{f.name}") for f in dataclasses.fields(ss.Subspaces)))
    red = UserReduce(sub, rows("keep"), rows("chosen"), rows("has_edit"), (rows("steer"), rows("steer_norm")))
    return data, red


class _PartitionPool:
    """`reduce.Pool` reading the sampled pairs back from the stored partitions."""

    def __init__(
        self,
        files: VerifiedFiles,
        where: dict[str, int],
        user_ids: list[str],
        n_layers: int,
        hidden: int,
        threads: int = 1,
    ):
        self.files, self.where, self.user_ids = files, where, user_ids
        self.n_layers, self.hidden, self.threads = n_layers, hidden, threads

    def __call__(self, member_pairs, labels, n_groups, max_pairs, seed):
        U, K = member_pairs.shape
        rows = ss.group_pair_rows(member_pairs, labels, n_groups, max_pairs, seed)
        # (group, slot) of every sampled pair, filed by the partition that holds it.
        wanted: dict[int, dict[tuple[str, int], tuple[int, int]]] = {}
        for g, idx in enumerate(rows):
            for slot, flat in enumerate(idx.tolist()):
                uid = self.user_ids[flat // K]
                wanted.setdefault(self.where[uid], {})[(uid, flat % K)] = (g, slot)
        kmax = max([len(r) for r in rows] + [1])
        out_p = out_n = None

        def sampled(k: int) -> tuple[pa.Table, list[tuple[int, int]]]:
            # Cut to the sampled rows in the reading thread: only those wait to be copied.
            table = self.files.get_parquet(part_keys(k).pairs)
            keys = zip(
                table.column("user_id").to_pylist(), table.column("pair_index").to_pylist(), strict=True
            )
            take, dest = [], []
            for row, key in enumerate(keys):
                if key in wanted[k]:
                    take.append(row)
                    dest.append(wanted[k][key])
            return table.take(pa.array(take, pa.int64())), dest

        for sub, dest in read_in_order(sampled, sorted(wanted), self.threads):
            ep = torch.from_numpy(column_matrix(sub, "emb_p").copy())
            en = torch.from_numpy(column_matrix(sub, "emb_n").copy())
            if out_p is None:
                d = ep.shape[1] // self.n_layers
                out_p = torch.zeros(n_groups, kmax, self.n_layers, d)
                out_n = torch.zeros(n_groups, kmax, self.n_layers, d)
            g_idx, s_idx = (torch.tensor(x) for x in zip(*dest, strict=True))
            out_p[g_idx, s_idx] = ep.reshape(sub.num_rows, self.n_layers, -1)
            out_n[g_idx, s_idx] = en.reshape(sub.num_rows, self.n_layers, -1)
        mask = torch.zeros(n_groups, kmax, dtype=torch.bool)
        for g, idx in enumerate(rows):
            mask[g, : len(idx)] = True
        if out_p is None:  # no group pools any pair (no user has an edit): empty group edits
            out_p = out_n = torch.zeros(n_groups, kmax, self.n_layers, self.hidden)
        return out_p, out_n, mask


def reduce_partitions(
    files: VerifiedFiles,
    n_partitions: int,
    cfg: ChameleonConfig,
    layers: Sequence[int],
    timings: dict[str, float] | None = None,
) -> tuple[Reduced | None, pa.Table | None, list[dict]]:
    """(reduced, profiles of the users with pairs, failures) of partitions 0..n-1, every file
    checked against its recorded hash; reduced and profiles are None when no user has pairs.
    Partitions are read `job.read_threads` at a time (at most that many held at once)."""
    t0 = time.perf_counter()
    sub_cfg = reduce_subspace_config(cfg)
    parts: list[tuple[UnitData, UserReduce]] = []
    profiles: list[pa.Table] = []
    failures: list[dict] = []
    where: dict[str, int] = {}

    def read(k: int) -> tuple[int, list[dict], pa.Table, tuple[UnitData, UserReduce] | None]:
        keys = part_keys(k)
        fails, prof = files.get_jsonl(keys.failures), files.get_parquet(keys.profiles)
        if not prof.num_rows:  # every user of the partition failed
            return k, fails, prof, None
        stored = stored_user_reduce(prof, cfg, layers)
        if stored is None:  # made without per-user results, or under other settings: reduce here
            data = tables_to_units(files.get_parquet(keys.pairs), prof, len(layers))
            red = reduce_users(data, sub_cfg, layers)
            data.H_P = data.H_N = None  # this partition's pair vectors are not needed any more
            stored = data, red
        # The refresh's record digests are the map's bookkeeping: partitions of older runs lack them.
        prof = without_user_reduce(prof)
        return k, fails, prof.drop_columns([c for c in [RECORD_DIGEST] if c in prof.column_names]), stored

    for k, fails, prof, stored in read_in_order(read, range(n_partitions), cfg.job.read_threads):
        failures += fails
        if stored is None:
            continue
        parts.append(stored)
        profiles.append(prof)
        where.update(dict.fromkeys(stored[0].user_ids, k))
    if not parts:
        return None, None, failures
    ids = [u for d, _ in parts for u in d.user_ids]
    order = torch.from_numpy(np.argsort(np.array(ids, dtype=object), kind="stable").astype(np.int64))
    data, users = _concat(parts, order)  # empties parts
    pool = _PartitionPool(
        files, where, data.user_ids, len(layers), users.sub.mean.shape[-1], cfg.job.read_threads
    )
    reduced = group_and_reduce(data, users, cfg, layers, timings, t0, pool)
    return reduced, pa.concat_tables(profiles), failures
