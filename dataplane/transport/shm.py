"""Same-host CPU transport: tensor bytes in a shared-memory ring, only a small header on the socket.

The sender owns a ring file of ``num_slots`` slots; byte ``i`` of the file's flag area
is 1 while slot ``i`` holds a message the receiver has not released. A tensor that
does not fit a slot travels inline as a frame instead.
"""

from __future__ import annotations

import itertools
import mmap
import os
import time
import uuid

import torch
import zmq

from common.errors import TransportError
from common.runtime import shared_memory_dir
from dataplane.transport.base import DTYPE_NAMES, Outbox

FLAG_BYTES = 64
ALIGN = 64


class ShmRing:
    """A file-backed ring of equal slots with one busy flag per slot. Owned by its sender."""

    def __init__(self, num_slots: int, slot_bytes: int) -> None:
        if not 1 <= num_slots <= FLAG_BYTES:
            raise TransportError(f"a shared-memory ring holds 1..{FLAG_BYTES} slots, not {num_slots}")
        self.num_slots, self.slot_bytes = num_slots, slot_bytes
        self.path = shared_memory_dir() / f"flexpipe-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, FLAG_BYTES + num_slots * slot_bytes)
            self.map = mmap.mmap(fd, FLAG_BYTES + num_slots * slot_bytes)
        finally:
            os.close(fd)
        self._next = itertools.cycle(range(num_slots))

    def acquire(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        delay = 0.0
        while True:
            for _ in range(self.num_slots):
                slot = next(self._next)
                if self.map[slot] == 0:
                    self.map[slot] = 1
                    return slot
            if time.monotonic() > deadline:
                raise TransportError(
                    f"receiver has not released any shared-memory slot of {self.path.name} for {timeout_s:.0f}s"
                )
            time.sleep(delay)
            delay = min(delay * 2 or 1e-5, 1e-3)

    def write(self, slot: int, offset: int, tensor: torch.Tensor) -> None:
        if tensor.numel() == 0:
            return
        start = FLAG_BYTES + slot * self.slot_bytes + offset
        nbytes = tensor.numel() * tensor.element_size()
        view = torch.frombuffer(memoryview(self.map)[start : start + nbytes], dtype=torch.uint8)
        view.copy_(tensor.reshape(-1).view(torch.uint8))

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass
        self.path.unlink(missing_ok=True)


class ShmOutbox(Outbox):
    """Puts tensors into slots of its own ring; falls back to inline frames for oversize messages."""

    def __init__(
        self,
        context: zmq.Context,
        address: str,
        num_slots: int = 16,
        slot_bytes: int = 4 << 20,
        timeout_s: float = 30.0,
    ) -> None:
        super().__init__(context, address, timeout_s)
        self.ring = ShmRing(num_slots, slot_bytes)

    def _place(self, tensors):
        tensors = [t.detach().to("cpu").contiguous() for t in tensors]
        sizes = [-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors]
        if sum(sizes) > self.ring.slot_bytes:
            return super()._place(tensors)
        slot, offset, meta = self.ring.acquire(self.timeout_s), 0, []
        for tensor, size in zip(tensors, sizes):
            self.ring.write(slot, offset, tensor)
            meta.append(
                [
                    DTYPE_NAMES[tensor.dtype],
                    list(tensor.shape),
                    ["shm", str(self.ring.path), slot, offset, self.ring.slot_bytes],
                ]
            )
            offset += size
        return meta, [], None

    def close(self) -> None:
        super().close()
        self.ring.close()


class ShmReader:
    """Maps senders' ring files on first use; tensors are zero-copy views until released."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.maps: dict[str, mmap.mmap] = {}

    def map_ring(self, path: str) -> mmap.mmap:
        if path not in self.maps:
            if os.path.dirname(os.path.normpath(path)) != str(shared_memory_dir()):
                raise TransportError(f"refusing shared-memory file outside {shared_memory_dir()}: {path}")
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            except OSError as exc:
                raise TransportError(f"cannot open shared-memory ring {path}: {exc}") from exc
            try:
                self.maps[path] = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
        return self.maps[path]

    def read(self, dtype, shape, where, frames):
        _, path, slot, offset, slot_bytes = where
        if not 0 <= slot < FLAG_BYTES:
            raise TransportError(f"shared-memory slot {slot} out of range")
        ring = self.map_ring(path)
        count = 1
        for dim in shape:
            count *= dim
        start = FLAG_BYTES + slot * slot_bytes + offset
        if count:
            # A memoryview export keeps the ring mapped for as long as the tensor lives:
            # closing the reader then cannot unmap memory a tensor still points into.
            window = memoryview(ring)[start : start + count * dtype.itemsize]
            tensor = torch.frombuffer(window, dtype=dtype, count=count).view(shape)
        else:
            tensor = torch.empty(shape, dtype=dtype)

        def release() -> None:
            ring[slot] = 0

        if self.device.type != "cpu":
            tensor = tensor.to(self.device)
            release()
            return tensor, None
        return tensor, release

    def close(self) -> None:
        for ring in self.maps.values():
            try:
                ring.close()
            except BufferError:
                pass
        self.maps.clear()
