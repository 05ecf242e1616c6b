"""What a worker's device is: NVML's view of a GPU, or a declared virtual device on a CPU host."""

from __future__ import annotations

from common import events as ev


def probe_device(
    worker_id: str, torch_device: str, memory_budget: int, host: str, rack: str = "rack0"
) -> ev.DeviceInfo:
    """A GPU (``cuda:N``) is described by NVML (name, total and free memory); anything else is a
    virtual CPU device of ``memory_budget`` bytes. The device id is the worker id."""
    if torch_device.startswith("cuda"):
        import pynvml  # nvidia-ml-py, installed on GPU hosts

        pynvml.nvmlInit()
        try:
            index = int(torch_device.split(":", 1)[1]) if ":" in torch_device else 0
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            return ev.DeviceInfo(
                device_id=worker_id,
                kind="gpu",
                name=name,
                memory_total=int(memory.total),
                memory_free=int(memory.free),
                host=host,
                rack=rack,
            )
        finally:
            pynvml.nvmlShutdown()
    return ev.DeviceInfo(
        device_id=worker_id,
        kind="cpu",
        name="virtual",
        memory_total=memory_budget,
        memory_free=memory_budget,
        host=host,
        rack=rack,
    )
