"""Which GPU is this? Asked of nvidia-smi, so choosing a backend never creates a CUDA context.

A CUDA context created before Celery forks its pool is unusable in the children; nvidia-smi answers
from NVML in another process. Engines are tied to the GPU model (name + compute capability) and
the TensorRT version, so these two strings are part of every engine's identity.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuInfo:
    name: str  # e.g. "NVIDIA H100 80GB HBM3", as nvidia-smi and the CUDA driver report it
    compute_capability: str  # e.g. "9.0"

    @property
    def slug(self) -> str:
        """File-name-safe form of the name, e.g. nvidia-h100-80gb-hbm3."""
        return gpu_slug(self.name)


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def query_gpus(timeout_s: float = 10.0) -> list[GpuInfo]:
    """All GPUs nvidia-smi lists, in its index order; empty without a driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.rsplit(",", 1)]
        if len(parts) == 2 and parts[0]:
            gpus.append(GpuInfo(parts[0], parts[1]))
    return gpus


def visible_gpu() -> GpuInfo | None:
    """The GPU this process will use (device 0 after CUDA_VISIBLE_DEVICES), or None."""
    gpus = query_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        first = visible.split(",")[0].strip()
        if not first or first == "-1":
            return None
        if first.isdigit():
            index = int(first)
            return gpus[index] if index < len(gpus) else None
        return gpus[0] if gpus else None  # a UUID: nvidia-smi's order does not tell us which
    return gpus[0] if gpus else None
