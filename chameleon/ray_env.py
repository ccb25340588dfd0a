"""Ray's environment for this process, without importing Ray: loopback-only defaults, a quiet
console, the arguments every entry point passes to `ray.init`, and the GPU count of a cluster.

Ray itself is imported only where DESIGN §2 allows it: the job's Ray driver calls
`job.replicas.init_ray` and serving's CLI `ray.init` directly, both with `ray_init_kwargs`: connect
to `address` (or RAY_ADDRESS; `auto` finds a running cluster) and, with neither, start a new local
Ray bound to loopback (never silently attaching to whatever cluster this machine last ran).

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


def ray_init_kwargs(
    address: str | None = None, *, num_cpus: int | None = None, ray_data: bool = True
) -> dict:
    """The `ray.init` arguments: join `address` / RAY_ADDRESS, or start a local Ray (`"address":
    "local"`). Sets the loopback defaults first; `ray_data=False`: the caller runs no Ray Data
    (Serve), so Ray Data's console settings are not asked for."""
    set_local_env_defaults()
    output = {"log_to_driver": False, "logging_level": logging.ERROR} if _quiet else {}
    if _quiet and ray_data:
        # Ray Data's actor pools make the driver's C++ core log an error-level notice about actor
        # constructor arguments on stderr; Ray's C++ logs of this run keep fatal errors only.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        return {"address": address, **output}
    return {"address": "local", "include_dashboard": False, "num_cpus": num_cpus, **output}


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
