"""Which resources a model replica asks for, and which batch size it runs, per device.

Two separate decisions, so that each can be tested on any machine:

- **the resource request** (`gpus_per_replica`), made by whoever starts replicas (the job's actor
  pools, serving's app) from what the Ray cluster has or its autoscaler can add: a GPU setting of
  `auto` asks for one GPU per replica when the cluster has GPUs, none otherwise; an explicit GPU
  request on a cluster without GPUs is refused at once (Ray would otherwise wait forever for a
  node that never comes);
- **the device** inside a replica (`core.model.pick_device`: cuda when torch sees one), and from it
  the batch size (`batch_size_for`).

Nothing here imports Ray: `cluster_gpu_capacity` (in `job.replicas` and `serving.app`) reads the
cluster's GPUs and the callers pass them in (and torch is imported only when a batch size is
chosen).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CPU_BATCH_SIZE = 16
"""`synth.batch_size: auto` on CPU: larger batches gain little there and hold more memory."""
GPU_BATCH_SIZE = 128
"""`auto` on a GPU with at least `LARGE_GPU_BYTES` of memory (A100/H100 class)."""
SMALL_GPU_BATCH_SIZE = 64
"""`auto` on smaller GPUs (A10G, L4: 24 GiB), where a 7B model leaves little room for the KV cache."""
LARGE_GPU_BYTES = 40 * 2**30


class NoGpuError(ValueError):
    """GPUs were asked for on a Ray cluster that has none (and cannot add any)."""


def gpus_per_replica(setting: float | str, available: float, *, setting_name: str) -> float:
    """GPUs one model replica asks for: `setting` (`auto` or a number) on a cluster with
    `available` GPUs (`cluster_gpu_capacity` of the job or of serving). `auto`: 1 with GPUs, else 0
    (CPU). A number is kept, and refused (`NoGpuError`, naming `setting_name`) when it asks for
    GPUs the cluster cannot have."""
    if setting == "auto":
        return 1.0 if available > 0 else 0.0
    wanted = float(setting)
    if wanted > 0 and available <= 0:
        raise NoGpuError(
            f"{setting_name}={wanted:g} asks for GPUs, but the Ray cluster has none and its autoscaler "
            f"cannot add any; set {setting_name} to auto (GPUs when there are some, else CPU) or 0 "
            "(a GPU node type that starts at zero nodes: declare it with $CHAMELEON_CLUSTER_MAX_GPUS)"
        )
    return wanted


def batch_size_for(setting: int | str, device: torch.device) -> int:
    """Sequences per generate()/capture call: `setting`, or for `auto` by device: 16 on CPU,
    128 on a GPU with 40 GiB or more, 64 on a smaller one."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    return GPU_BATCH_SIZE if total >= LARGE_GPU_BYTES else SMALL_GPU_BATCH_SIZE
