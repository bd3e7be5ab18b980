"""What a peer declares about its machine: CPU cores, RAM, GPU (psutil, so on Linux, macOS and Windows)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import psutil


def ram_bytes() -> int:
    return psutil.virtual_memory().total


def available_memory() -> int:
    """Bytes of memory available for new allocations without swapping."""
    return psutil.virtual_memory().available


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name, found without importing torch (which costs ~300 MB per peer):
    from the Linux driver's files, else ``nvidia-smi`` where it is installed (any system)."""
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("Model:"):
                return line.split(":", 1)[1].strip()
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
