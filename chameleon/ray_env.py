"""Joining or starting Ray, and sizing torch inside Ray workers: the one place for both.

Every entry point that needs Ray (the job's Ray driver, the evaluation's answer pool, the server)
calls `init_ray`: it connects to `address` (or RAY_ADDRESS; `auto` finds a running cluster) and,
with neither, starts a new local Ray bound to loopback (never silently attaching to whatever
cluster this machine last ran).
"""

from __future__ import annotations

import os

LOCAL_ENV_DEFAULTS = {
    # On Linux Ray binds the machine's external address even when told 127.0.0.1 unless this is 0.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def set_local_env_defaults() -> None:
    """Loopback-only ports and no usage stats, unless the environment already says otherwise."""
    for key, value in LOCAL_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start a local Ray; returns True when it started one.
    Does nothing when Ray is already initialized in this process."""
    set_local_env_defaults()
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address)
        return False
    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus)
    return True


def worker_torch_threads(configured: int | None = None) -> int:
    """Torch threads for a model replica inside a Ray worker: the configured number, else the CPUs
    Ray gave the worker (Ray sets OMP_NUM_THREADS from them), so replicas don't oversubscribe."""
    import torch

    n = configured or max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.set_num_threads(n)
    return n
