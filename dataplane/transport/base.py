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

_meta_encoder = msgspec.msgpack.Encoder()
_meta_decoder = msgspec.msgpack.Decoder(list)

DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.int64: "i64",
               torch.int32: "i32", torch.uint8: "u8", torch.float64: "f64"}
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
                raise TransportError(f"cannot send a {tensor.dtype} tensor; supported dtypes: {', '.join(map(str, DTYPE_NAMES))}")
        if not tensors:
            frames = [header]
        else:
            meta, payload, after_send = self._place(list(tensors))
            frames = [header, _meta_encoder.encode(meta), *payload]
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


class Inbox:
    """The one receiving endpoint of a stage or engine. Reads tensors of every transport kind.

    Invariant: returned tensors are valid until the message is released; inline frames
    are zero-copy views of the received ZeroMQ frames."""

    def __init__(self, context: zmq.Context, bind_address: str, device: str = "cpu") -> None:
        self.socket = context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.device = torch.device(device)
        if bind_address.endswith(":0"):
            port = self.socket.bind_to_random_port(bind_address.rsplit(":", 1)[0])
            bind_address = f"{bind_address.rsplit(':', 1)[0]}:{port}"
        else:
            self.socket.bind(bind_address)
        self.address = bind_address
        self._readers: dict[str, object] = {}

    def recv(self, timeout_ms: int | None = None) -> Message | None:
        if timeout_ms is not None and not self.socket.poll(timeout_ms):
            return None
        frames = self.socket.recv_multipart(copy=False)
        header = frames[0].bytes
        if len(frames) == 1:
            return Message(header, [])
        message = Message(header, [])
        try:
            for dtype, shape, where in _meta_decoder.decode(frames[1].buffer):
                tensor, release = self._reader(where[0]).read(DTYPES_BY_NAME[dtype], shape, where, frames[2:])
                message.tensors.append(tensor)
                if release is not None:
                    message._releases.append(release)
        except TransportError:
            message.release()
            raise
        except (msgspec.DecodeError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            message.release()
            raise TransportError(f"unreadable message on {self.address} (malformed tensor metadata?): {exc!r}") from exc
        return message

    def _reader(self, kind: str):
        if kind not in self._readers:
            self._readers[kind] = _make_reader(kind, self.device)
        return self._readers[kind]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
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


def _make_reader(kind: str, device: torch.device):
    if kind == "frame":
        return FrameReader(device)
    if kind == "shm":
        from dataplane.transport.shm import ShmReader
        return ShmReader(device)
    if kind == "cuda":
        from dataplane.transport.cuda_ipc import CudaIpcReader
        return CudaIpcReader(device)
    if kind == "dist":
        from dataplane.transport.torch_dist import DistReader
        return DistReader(device)
    raise TransportError(f"a message carries tensors of unknown kind {kind!r}")
