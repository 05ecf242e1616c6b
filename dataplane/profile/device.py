"""What a profile ran on, as ``ModelProfile.device`` records it."""

from __future__ import annotations

import os

CUDA_TRANSPORTS = ("cuda_ipc",)


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_description(transport: str) -> str:
    """``"cpu: N cores"`` for the CPU transports; the CUDA device name(s) (e.g. ``"NVIDIA H200"``) for ``cuda_ipc``."""
    if transport not in CUDA_TRANSPORTS:
        return f"cpu: {cpu_cores()} cores"
    import torch

    names = dict.fromkeys(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return ", ".join(names) or "cuda: no device"
