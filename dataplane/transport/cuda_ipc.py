"""Same-host GPU transport: tensor bytes in CUDA buffers shared once through CUDA IPC handles.

Like the shared-memory ring, the sender owns ``num_slots`` device buffers and a small
host flag file (busy flag per slot); the receiver opens each buffer's IPC handle once
and reads tensors in place. Handles travel as plain MessagePack values, never pickled.
"""

from __future__ import annotations

import torch
import zmq

from common.errors import TransportError
from dataplane.transport.base import DTYPE_NAMES, Outbox
from dataplane.transport.shm import ALIGN, ShmRing


class CudaIpcOutbox(Outbox):
    """Copies tensors into its own CUDA slot buffers, synchronises, then sends the header."""

    def __init__(
        self,
        context: zmq.Context,
        address: str,
        device: str,
        num_slots: int = 16,
        slot_bytes: int = 16 << 20,
        timeout_s: float = 30.0,
    ) -> None:
        if not torch.cuda.is_available():
            raise TransportError("transport 'cuda_ipc' needs a CUDA device; use 'shm' on CPU hosts")
        super().__init__(context, address, timeout_s)
        self.device = torch.device(device)
        self.flags = ShmRing(num_slots, 0)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(num_slots)]
        self.handles = [_share(buffer) for buffer in self.slots]
        self.slot_bytes = slot_bytes

    def _place(self, tensors):
        sizes = [-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors]
        if sum(sizes) > self.slot_bytes:
            return super()._place(tensors)
        slot, offset, meta = self.flags.acquire(self.timeout_s), 0, []
        for tensor, size in zip(tensors, sizes):
            nbytes = tensor.numel() * tensor.element_size()
            self.slots[slot][offset : offset + nbytes].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
            meta.append(
                [
                    DTYPE_NAMES[tensor.dtype],
                    list(tensor.shape),
                    ["cuda", str(self.flags.path), slot, offset, self.handles[slot]],
                ]
            )
            offset += size
        torch.cuda.current_stream(self.device).synchronize()
        return meta, [], None

    def close(self) -> None:
        super().close()
        self.flags.close()


def _share(buffer: torch.Tensor) -> list:
    handle = buffer.untyped_storage()._share_cuda_()
    return [item if not isinstance(item, bytes) else bytes(item) for item in handle]


class CudaIpcReader:
    """Opens senders' CUDA buffers once per handle; releases a slot after the local stream is done with it."""

    def __init__(self, device: torch.device) -> None:
        from dataplane.transport.shm import ShmReader

        self.device = device
        self.flags = ShmReader(torch.device("cpu"))
        self.buffers: dict[tuple[bytes, int], torch.Tensor] = {}

    def _open(self, handle: list) -> torch.Tensor:
        # the IPC handle names the sender's whole cudaMalloc segment, which the caching
        # allocator may share between slots: the slot is the handle plus its byte offset
        key = (bytes(handle[1]), handle[3])
        if key not in self.buffers:
            storage = torch.UntypedStorage._new_shared_cuda(*handle)
            self.buffers[key] = torch.empty(0, dtype=torch.uint8, device=f"cuda:{handle[0]}").set_(storage)
        return self.buffers[key]

    def read(self, dtype, shape, where, frames):
        _, flag_path, slot, offset, handle = where
        buffer = self._open(handle)
        count = 1
        for dim in shape:
            count *= dim
        nbytes = count * torch.empty(0, dtype=dtype).element_size()
        tensor = buffer[offset : offset + nbytes].view(dtype).view(shape)
        flags = self.flags.map_ring(flag_path)

        def release() -> None:
            torch.cuda.current_stream(tensor.device).synchronize()
            flags[slot] = 0

        return tensor, release

    def close(self) -> None:
        self.buffers.clear()
        self.flags.close()
