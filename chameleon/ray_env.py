"""Joining or starting Ray, and sizing torch inside Ray workers: the one place for both.

Every entry point that needs Ray (the job's Ray driver, the evaluation's answer pool, the server)
calls `init_ray`: it connects to `address` (or RAY_ADDRESS; `auto` finds a running cluster) and,
with neither, starts a new local Ray bound to loopback (never silently attaching to whatever
cluster this machine last ran).

The console is quiet unless the CLI was asked for `-v`: `chameleon.cli.main` calls
`set_quiet_console`, and Ray started or joined afterwards keeps its INFO lines and its workers'
output off the terminal (both stay in the session's logs under /tmp/ray/session_latest/logs), and
Ray Data shows one progress bar and only its errors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

LOCAL_ENV_DEFAULTS = {
    # On Linux Ray binds the machine's external address even when told 127.0.0.1 unless this is 0.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def set_local_env_defaults() -> None:
    """Loopback-only ports and no usage stats, unless the environment already says otherwise."""
    for key, value in LOCAL_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


_quiet = False


def set_quiet_console(quiet: bool) -> None:
    """Quiet Ray on this process's terminal from now on (`chameleon.cli.main` without `-v`)."""
    global _quiet
    _quiet = quiet


def quiet_console() -> bool:
    """Whether this process keeps library chatter off its terminal (set by `set_quiet_console`)."""
    return _quiet


def _quiet_ray_data() -> None:
    """Ray Data in this driver: the global progress bar only (no per-operator bars), and on the
    console only errors (its execution plans and progress lines still go to ray-data.log)."""
    from ray.data import DataContext
    from ray.data._internal.logging import SessionFileHandler

    DataContext.get_current().enable_operator_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):
            handler.setLevel(logging.ERROR)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, ray_data: bool = True) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start a local Ray; returns True when it started one.
    Does nothing when Ray is already initialized in this process. `ray_data=False`: the caller
    runs no Ray Data (Serve), so its console settings are not loaded."""
    set_local_env_defaults()
    import ray

    if ray.is_initialized():
        return False
    output = {"log_to_driver": False, "logging_level": logging.ERROR} if _quiet else {}
    if _quiet and ray_data:
        # Ray Data's actor pools make the driver's C++ core log an error-level notice about actor
        # constructor arguments on stderr; Ray's C++ logs of this run keep fatal errors only.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **output)
    else:
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, **output)
    if _quiet and ray_data:
        _quiet_ray_data()
    return not address


MAX_GPUS_ENV = "CHAMELEON_CLUSTER_MAX_GPUS"
"""The most GPUs a cluster's autoscaler can add, declared by its config (cluster/*.yaml and
ray-cluster.yaml set it): Ray 2.60's autoscaler does not report its node types to the cluster, so
a GPU group that starts at zero pods is otherwise invisible until its first pod is up."""


def cluster_gpus(
    resources: Mapping[str, float],
    autoscaler_max: Mapping[str, float] | None,
    declared: str | None = None,
) -> float:
    """GPUs a Ray cluster has now (`ray.cluster_resources()`) or can add: the most its
    autoscaler's node types provide, as Ray reports them (`None`: not reported) or as declared
    in `$CHAMELEON_CLUSTER_MAX_GPUS` (`declared`, read from the environment when not given)."""
    declared = os.environ.get(MAX_GPUS_ENV, "") if declared is None else declared
    try:
        declared_gpus = float(declared) if declared.strip() else 0.0
    except ValueError:
        raise ValueError(f"${MAX_GPUS_ENV} must be a number of GPUs, got {declared!r}") from None
    reported = float((autoscaler_max or {}).get("GPU", 0))
    return max(float(resources.get("GPU", 0)), reported, declared_gpus)


def cluster_gpu_capacity() -> float:
    """GPUs of the Ray cluster this process is connected to (`cluster_gpus`): those it has now, or
    the most its autoscaler can add (a GPU group that scales from zero has none at the start)."""
    import ray
    from ray._private.state import state

    try:  # the autoscaler's node types, as Ray Train reads them; None when not reported
        autoscaler_max = state.get_max_resources_from_cluster_config()
    except Exception:  # an older or a client-mode connection: what the cluster has now
        autoscaler_max = None
    return cluster_gpus(ray.cluster_resources(), autoscaler_max)
