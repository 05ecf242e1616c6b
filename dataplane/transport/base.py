"""Data-plane channels: a header plus tensors from one stage to the next.

Every stage owns one ``Inbox`` (a bound ZeroMQ PULL socket); senders hold an
``Outbox`` per destination. A message is ``[header, meta, *frames]``: the header is
opaque bytes (a MessagePack micro-batch header), ``meta`` describes each tensor and
where its bytes are — inline frames, a shared-memory slot, a CUDA IPC buffer, or a
torch.distributed point-to-point transfer. The backends differ only in where they
put tensor bytes; the Inbox reads every kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import msgspec
import torch
import zmq

from common.errors import TransportError

TRANSPORTS = ("shm", "tcp", "cuda_ipc", "nccl", "gloo")

meta_encoder = msgspec.msgpack.Encoder()
meta_decoder = msgspec.msgpack.Decoder(list)

DTYPE_NAMES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
    torch.float64: "f64",
}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def check_transport(kind: str) -> str:
    if kind not in TRANSPORTS:
        raise TransportError(f"unknown transport {kind!r}; choose one of {', '.join(TRANSPORTS)}")
    return kind


@dataclass
class Message:
    """A received message. Tensors may be views into transport buffers: call ``release()``
    once they are no longer needed so the sender can reuse the buffer."""

    header: bytes
    tensors: list[torch.Tensor]
    _releases: list[Callable[[], None]] = field(default_factory=list)

    def release(self) -> None:
        for release in self._releases:
            release()
        self._releases.clear()


class Outbox:
    """Sends to one Inbox. Subclasses decide where tensor bytes go via ``_place``.

    Invariant: messages arrive in send order; ``send`` never blocks longer than
    ``timeout_s`` (then it raises ``TransportError``)."""

    def __init__(self, context: zmq.Context, address: str, timeout_s: float = 30.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.socket = context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        self.socket.connect(address)

    def send(self, header: bytes, tensors: Sequence[torch.Tensor] = ()) -> None:
        for tensor in tensors:
            if tensor.dtype not in DTYPE_NAMES:
                raise TransportError(
                    f"cannot send a {tensor.dtype} tensor; supported dtypes: {', '.join(map(str, DTYPE_NAMES))}"
                )
        if not tensors:
            frames = [header]
        else:
            meta, payload, after_send = self._place(list(tensors))
            frames = [header, meta_encoder.encode(meta), *payload]
        try:
            self.socket.send_multipart(frames, copy=False)
        except zmq.Again as exc:
            raise TransportError(f"no receiver took a message on {self.address} within {self.timeout_s:.0f}s") from exc
        if tensors and after_send is not None:
            after_send()

    def _place(self, tensors: list[torch.Tensor]):
        """Returns (meta per tensor, extra frames, callback run after the header is sent)."""
        meta, frames = [], []
        for tensor in tensors:
            tensor = tensor.detach().to("cpu").contiguous()
            meta.append([DTYPE_NAMES[tensor.dtype], list(tensor.shape), ["frame", len(frames)]])
            frames.append(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else b"")
        return meta, frames, None

    def close(self) -> None:
        self.socket.close(linger=0)


class FrameReader:
    """Reads tensors carried inline as ZeroMQ frames (zero-copy views of the frame)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def read(self, dtype, shape, where, frames):
        buffer = frames[where[1]].buffer
        if len(buffer) == 0:
            return torch.empty(shape, dtype=dtype, device=self.device), None
        tensor = torch.frombuffer(buffer, dtype=dtype).view(shape)
        return tensor.to(self.device), None

    def close(self) -> None:
        pass
