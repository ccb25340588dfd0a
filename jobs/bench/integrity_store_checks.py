"""Two checks of `job_integrity.py` (kept here so that script stays readable): forgetting users
wherever their bytes are, and what the store really enforces. Each is `check_<name>(workdir,
args) -> dict` like the others; `job_integrity.py` imports and registers them. Run alone, this
script runs both and prints their figures, `store_integrity_violations` (goal 0) last.

    python jobs/bench/integrity_store_checks.py [--poison-users 100] [--smoke] [--out FILE]

    forget   a run whose input holds hostile ids (`user`, `"alice "`, a line that is not JSON,
             broken JSON; `chameleon.dev.forget_case`) with --poison-users other users, placed in
             every hiding place (a committed run with an abandoned attempt folder, an abandoned
             job, a run whose deletion was interrupted) on SeaweedFS; then `forget_users` with
             `delete_old`. A plain byte scan of every object under the store, Parquet decoded:
             forget_user_bytes_found, other_rejects_dropped (goal 0)
    storage  the capability probe on SeaweedFS; on moto behind a loopback proxy that drops
             `If-None-Match` (a store that ignores it): conditional_create_ignored = 1 unless the
             writer is refused and, in single-writer mode, a second committer is refused; a
             multipart upload through a recording proxy in front of SeaweedFS:
             multipart_parts_without_checksum (goal 0)
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from common import parse, parser, report, stub_manifest

from chameleon.data import s3_protocol, storage
from chameleon.data.artifacts import RunConflictError, RunReader, RunWriter
from chameleon.data.capabilities import StoreCapabilityError, check_store, probe_store
from chameleon.data.storage import S3Store
from chameleon.dev.forget_case import (
    FORGOTTEN,
    bytes_found,
    forgotten_needles,
    hide_everywhere,
    other_reject_markers,
)
from chameleon.dev.s3proxy import S3Proxy
from chameleon.dev.s3server import LocalS3Server
from chameleon.job.forget import forget_users

_SERVERS: dict[str, LocalS3Server] = {}


def _server(backend: str, workdir: Path) -> LocalS3Server:
    if backend not in _SERVERS:
        data_dir = {"data_dir": workdir / f"s3-{backend}"} if backend == "seaweedfs" else {}
        _SERVERS[backend] = LocalS3Server(backend=backend, **data_dir).start()  # type: ignore[arg-type]
    return _SERVERS[backend]


def stop_servers() -> None:
    for server in _SERVERS.values():
        server.stop()
    _SERVERS.clear()


def _store(server: LocalS3Server, endpoint: str | None = None, **options) -> S3Store:
    opts = {**server.storage_options(), **({"endpoint_url": endpoint} if endpoint else {}), **options}
    return S3Store("integrity", f"p-{uuid.uuid4().hex[:8]}", create_bucket=True, **opts)


def check_forget(workdir: Path, args) -> dict[str, int | float]:
    store = _store(_server("seaweedfs", workdir))
    hide_everywhere(store, n_others=args.poison_users)
    needles = forgotten_needles()
    before = len(bytes_found(store, needles))
    t0 = time.perf_counter()
    res = forget_users(store, list(FORGOTTEN), new_run="after", delete_old=True)
    took = time.perf_counter() - t0
    rejects = RunReader(store, "after").get_bytes("rejects.jsonl").decode()
    found = bytes_found(store, needles)  # every object under the store's root
    for key, needle in found[:5]:
        print(f"# forget: {needle!r} in {key}")
    return {
        "forget_user_bytes_found_before": before,
        "forget_runs_deleted": len(res.deleted),
        "forget_call_s": round(took, 2),
        "other_rejects_dropped": sum(m not in rejects for m in other_reject_markers()),
        "forget_user_bytes_found": len(found),
    }


def check_storage(workdir: Path, args) -> dict[str, int | float | str]:
    out: dict[str, int | float | str] = {}
    seaweed = _server("seaweedfs", workdir)
    caps = probe_store(_store(seaweed))
    out["seaweedfs_probe"] = f"{caps.conditional_create}/{caps.checksums}/{caps.multipart_checksums}"

    # A store that ignores If-None-Match: moto behind a proxy that drops the header.
    moto = _server("moto", workdir)
    ignored = 0
    with S3Proxy(moto.endpoint_url, drop={"if-none-match"}) as proxy:
        store = _store(moto, proxy.url)
        caps = probe_store(store)
        out["ignoring_store_probe"] = caps.conditional_create
        ignored += caps.conditional_create != "ignored"  # not detected
        try:
            check_store(store)
            ignored += 1  # not refused
        except StoreCapabilityError:
            pass
        check_store(store, single_writer=True)  # the documented opt-in
        first, second = RunWriter(store, "r"), RunWriter(store, "r")
        first.put_json("x.json", {"writer": 1})
        second.put_json("x.json", {"writer": 2})
        first.commit(stub_manifest())
        try:
            second.commit(stub_manifest())
            ignored += 1  # the second writer replaced the manifest
        except RunConflictError:
            pass
    out["conditional_create_ignored"] = ignored

    # Multipart: every part through a recording proxy in front of SeaweedFS (which checks them).
    saved = storage._MULTIPART_THRESHOLD, s3_protocol.PART_SIZE
    storage._MULTIPART_THRESHOLD, s3_protocol.PART_SIZE = 5 << 20, 5 << 20  # small parts, same code
    try:
        with S3Proxy(seaweed.endpoint_url) as proxy:
            store = _store(seaweed, proxy.url)
            blob = os.urandom(1 << 20) * 21
            store.put_bytes("runs/big/users/shard-00000.safetensors", blob)
            assert store.get_bytes("runs/big/users/shard-00000.safetensors") == blob
            parts = proxy.upload_parts()
    finally:
        storage._MULTIPART_THRESHOLD, s3_protocol.PART_SIZE = saved
    out["multipart_parts"] = len(parts)
    out["multipart_parts_without_checksum"] = sum("x-amz-checksum-sha256" not in p.headers for p in parts) + (
        not parts
    )
    return out


GOAL_0 = ("forget_user_bytes_found", "other_rejects_dropped", "conditional_create_ignored",
          "multipart_parts_without_checksum")  # fmt: skip


def main() -> None:
    import tempfile

    p = parser(__doc__)
    p.add_argument("--poison-users", type=int, default=100, help="forget: other users in the run")
    args = parse(p, {"poison_users": 8})
    workdir = Path(tempfile.mkdtemp(prefix="chameleon-store-integrity-"))
    try:
        figures = {**check_forget(workdir, args), **check_storage(workdir, args)}
    finally:
        stop_servers()
    figures["store_integrity_violations"] = sum(int(figures[k]) for k in GOAL_0)
    report(figures, "store_integrity_violations", args.out)


if __name__ == "__main__":
    main()
