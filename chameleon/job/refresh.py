"""Map a partition, reusing what a source run already computed for users whose record is unchanged.

`chameleon personalize --input NEW --update-from RUN` publishes a new run in which

- a user whose validated record is byte-for-byte the one the source run mapped (same
  `record_sha256`, a column every run's profiles carry) keeps the source run's profile row (with
  its per-user reduce) and pairs: no model call;
- a changed or new user is mapped as in a full run;
- a user no longer in the input is in no partition, so the new run does not hold them (older runs
  still do: `chameleon forget` deletes those).

Grouping, the group reduce and calibration then run over every user as usual. Reuse is exact
because a user's map and per-user reduce depend only on the user (greedy answers, per-unit CCS
stopping), and the source run must have been made under the same job spec except for its input
(`job.spec.check_refresh_source`) and with the same model weights (its fingerprint).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import torch

from chameleon.config import ChameleonConfig
from chameleon.core.records import UserRecord
from chameleon.data.artifacts import RunReader
from chameleon.data.layout import done_key, part_keys
from chameleon.data.parallel_reads import read_in_order
from chameleon.data.published import PublishedRun
from chameleon.data.storage import StoreKeyError
from chameleon.job.stages import process_partition
from chameleon.job.tables import UNIT_SIGNATURE, pairs_to_tables, unit_signature

RECORD_DIGEST = "record_sha256"
"""Profiles column: the sha256 of the user's validated record (what decides "unchanged")."""


def record_digest(user: UserRecord) -> str:
    """A canonical digest of a validated record: key order and whitespace of the input do not count."""
    text = json.dumps(user.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class RefreshSource:
    """A committed run whose per-user results a refresh may reuse, and where each user is held."""

    reader: RunReader
    partition_of: dict[str, int]
    """user id -> the source partition that held the user (mapped or failed there)"""

    @property
    def run_id(self) -> str:
        return self.reader.run_id

    def partitions_for(self, user_ids: Sequence[str]) -> list[int]:
        """The source partitions holding any of `user_ids`."""
        return sorted({self.partition_of[u] for u in user_ids if u in self.partition_of})


def open_source(reader: RunReader, threads: int = 16) -> RefreshSource:
    """Index a committed run's users by partition, from its done records (user ids only, read
    `threads` at a time)."""

    def ids(k: int) -> list[str]:
        try:
            record = json.loads(reader.run_store.get_bytes(done_key(k)))
        except (StoreKeyError, ValueError):
            return []
        return list(record.get("user_ids") or []) if isinstance(record, dict) else []

    partition_of: dict[str, int] = {}
    n = reader.manifest.counts.partitions
    for k, users in enumerate(read_in_order(ids, range(n), threads)):
        partition_of.update(dict.fromkeys(users, k))
    return RefreshSource(reader, partition_of)


def _reusable_rows(
    reader: RunReader, parts: Sequence[int], digests: Mapping[str, str], signature: bytes
) -> tuple[pa.Table | None, pa.Table | None]:
    """(pairs, profiles) rows of the source partitions `parts` whose user is in `digests` with the
    same record digest, computed under `signature` (the per-user reduce settings)."""
    pairs_out, profiles_out = [], []
    for k in parts:
        profiles = reader.get_parquet(part_keys(k).profiles)
        meta = profiles.schema.metadata or {}
        if RECORD_DIGEST not in profiles.column_names or meta.get(UNIT_SIGNATURE) != signature:
            continue
        ids = profiles.column("user_id").to_pylist()
        stored = profiles.column(RECORD_DIGEST).to_pylist()
        keep = [u for u, d in zip(ids, stored, strict=True) if digests.get(u) == d]
        if not keep:
            continue
        wanted = pa.array(keep, pa.string())
        profiles_out.append(profiles.filter(pc.is_in(profiles.column("user_id"), value_set=wanted)))
        pairs = reader.get_parquet(part_keys(k).pairs)
        pairs_out.append(pairs.filter(pc.is_in(pairs.column("user_id"), value_set=wanted)))
    if not profiles_out:
        return None, None
    return pa.concat_tables(pairs_out), pa.concat_tables(profiles_out)


def with_digests(profiles: pa.Table, users: Sequence[UserRecord]) -> pa.Table:
    """`profiles` with each user's `record_sha256` (the column a later refresh compares)."""
    digest = {u.user_id: record_digest(u) for u in users}
    col = pa.array([digest[u] for u in profiles.column("user_id").to_pylist()], pa.string())
    return profiles.append_column(RECORD_DIGEST, col)


def _concat(a: pa.Table | None, b: pa.Table) -> pa.Table:
    """Rows of `a` (reused) then `b` (mapped now); an empty side (no vector columns) is left out."""
    if a is None or not a.num_rows:
        return b
    if not b.num_rows:
        return a
    return pa.concat_tables([a, b.select(a.column_names).replace_schema_metadata(a.schema.metadata)])


@dataclass
class PartitionReuse:
    """What a refresh's source run supplies for one partition, and which of its users are left to map."""

    users: Sequence[UserRecord]
    todo: list[UserRecord]
    reused_pairs: pa.Table | None = None
    reused_profiles: pa.Table | None = None

    @property
    def reused(self) -> list[str]:
        profiles = self.reused_profiles
        return sorted(set(profiles.column("user_id").to_pylist())) if profiles is not None else []


def reuse_rows(
    users: Sequence[UserRecord],
    cfg: ChameleonConfig,
    layers: Sequence[int],
    source: RunReader | None = None,
    source_parts: Sequence[int] = (),
) -> PartitionReuse:
    """The rows of `users` the source run holds unchanged (in its partitions `source_parts`:
    `RefreshSource.partitions_for`), and the users left to map; without a source, every user."""
    if source is None or not source_parts:
        return PartitionReuse(users, list(users))
    digests = {u.user_id: record_digest(u) for u in users}
    pairs, profiles = _reusable_rows(source, source_parts, digests, unit_signature(cfg, layers))
    reused = set(profiles.column("user_id").to_pylist()) if profiles is not None else set()
    return PartitionReuse(users, [u for u in users if u.user_id not in reused], pairs, profiles)


BUNDLE_PARTITIONS = 16
"""At most this many partitions of a refresh are mapped in one batch (`in_bundles`): the reused
rows of a bundle are held until it is written."""


def in_bundles(
    reuses: Iterable[tuple[int, PartitionReuse]], cfg: ChameleonConfig, *, refresh: bool
) -> Iterator[list[tuple[int, PartitionReuse]]]:
    """Partitions (k, what the source supplies) grouped for `map_reused`. A full run maps
    partition by partition. A refresh maps a bundle once its users left to map fill a partition
    (a full run's batch), or at `BUNDLE_PARTITIONS`: a refresh in which a few users of many
    partitions changed then pays the map's per-batch cost (generation and per-user CCS steps,
    about the same for 1 user as for 64) once per bundle, not once per partition."""
    bundle: list[tuple[int, PartitionReuse]] = []
    for k, reuse in reuses:
        bundle.append((k, reuse))
        todo = sum(len(r.todo) for _, r in bundle)
        if not refresh or todo >= cfg.job.users_per_partition or len(bundle) >= BUNDLE_PARTITIONS:
            yield bundle
            bundle = []
    if bundle:
        yield bundle


def map_reused(
    model, tok, bundle: Sequence[PartitionReuse], cfg: ChameleonConfig, layers: Sequence[int]
) -> list[tuple[pa.Table, pa.Table, list[dict], list[str]]]:
    """Map the users left to map of every partition of `bundle` in one `stages.process_partition`
    (a user's map and per-user reduce depend on the user only), then split the results by
    partition: per partition (pairs, profiles, failures, reused user ids)."""
    todo = [u for r in bundle for u in r.todo]
    if todo:
        pairs, profiles, failures = process_partition(model, tok, todo, cfg, layers)
    else:
        (pairs, profiles), failures = pairs_to_tables([]), []
    profiles = with_digests(profiles, todo)
    out = []
    for r in bundle:
        ids = {u.user_id for u in r.todo}
        if len(bundle) == 1:
            mine_pairs, mine_profiles = pairs, profiles
        else:
            wanted = pa.array(sorted(ids), pa.string())
            mine_pairs = pairs.filter(pc.is_in(pairs.column("user_id"), value_set=wanted))
            mine_profiles = profiles.filter(pc.is_in(profiles.column("user_id"), value_set=wanted))
        out.append((
            _concat(r.reused_pairs, mine_pairs), _concat(r.reused_profiles, mine_profiles),
            [f for f in failures if f["user_id"] in ids], r.reused,
        ))  # fmt: skip
    return out


def check_source_model(reader: RunReader, fingerprint: Mapping[str, object]) -> None:
    """Refuse to reuse a run's results made with other model weights than this job's."""
    recorded = reader.manifest.model.fingerprint
    if recorded != dict(fingerprint):
        raise ValueError(
            f"run {reader.run_id} was made with other model weights than this job's model; "
            "its per-user results cannot be reused: run without --update-from"
        )


def compare_runs(a: RunReader, b: RunReader, user_ids: Sequence[str], atol: float = 1e-5) -> list[str]:
    """What differs between two committed runs of one input (empty when nothing does): `user_ids`'
    stored per-user results and published user edits, every user's group, and every group edit
    (tensors within `atol`). How a refresh is checked against a full run of its input."""
    out: list[str] = []

    def units(reader: RunReader) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        for k in range(reader.manifest.counts.partitions):
            table = reader.get_parquet(part_keys(k).profiles)
            cols = [c for c in table.column_names if c.startswith("unit_")]
            for row in table.select(["user_id", *cols]).to_pylist():
                rows[row.pop("user_id")] = row
        return rows

    def close(x, y) -> bool:
        tx, ty = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
        if tx.dim() == 1 and ty.dim() == 1 and isinstance(x, list) and x and isinstance(x[0], bool):
            # Pair-slot masks are padded with False to the widest user of their partition.
            n = max(len(tx), len(ty))
            tx, ty = (torch.nn.functional.pad(t, (0, n - len(t))) for t in (tx, ty))
        return tx.shape == ty.shape and bool(torch.allclose(tx, ty, rtol=0, atol=atol))

    ua, ub = units(a), units(b)
    for u in user_ids:
        if u not in ua or u not in ub:
            out.append(f"user {u}: in one run only")
            continue
        bad = [c for c in ua[u] if c not in ub[u] or not close(ua[u][c], ub[u][c])]
        if bad:
            out.append(f"user {u}: per-user results differ in {bad}")
    pa_, pb = PublishedRun(a), PublishedRun(b)
    ga = {u: r["group_id"] for u, r in pa_.assignments().items()}
    gb = {u: r["group_id"] for u, r in pb.assignments().items()}
    if ga != gb:
        out.append(
            f"group assignments differ for {sum(ga.get(u) != gb.get(u) for u in set(ga) | set(gb))} users"
        )
    for g in sorted(set(pa_.group_ids) | set(pb.group_ids)):
        if g not in pa_.group_ids or g not in pb.group_ids:
            out.append(f"group {g}: in one run only")
            continue
        ta, tb = pa_.group_edit(g).to_tensors(), pb.group_edit(g).to_tensors()
        if set(ta) != set(tb) or not all(close(ta[n], tb[n]) for n in ta):
            out.append(f"group {g}: edits differ")
    for u in user_ids:
        ea, eb = pa_.user_edit(u), pb.user_edit(u)
        if (ea is None) != (eb is None):
            out.append(f"user {u}: an own edit in one run only")
        elif ea is not None:
            ta, tb = ea.to_tensors(), eb.to_tensors()
            if set(ta) != set(tb) or not all(close(ta[n], tb[n]) for n in ta):
                out.append(f"user {u}: published edits differ")
    return out
