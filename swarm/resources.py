"""What a peer declares about its machine: CPU cores, RAM, GPU (psutil, so on Linux, macOS and Windows)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

import psutil


def ram_bytes() -> int:
    return psutil.virtual_memory().total


def available_memory() -> int:
    """Bytes of memory available for new allocations without swapping."""
    return psutil.virtual_memory().available


@functools.cache
def gpu_name() -> str | None:
    """The first CUDA GPU's name: torch's where torch is loaded (training peers load it first),
    else ``nvidia-smi``'s where it is installed (any system), so that a peer that does not train
    does not import torch (~300 MB) only to name its GPU. Asked once per process."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except Exception:  # a broken driver: no GPU to declare
            return None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=5, check=True).stdout
            return out.splitlines()[0].strip() if out.strip() else None
        except (subprocess.SubprocessError, OSError):
            return None
    return None


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
