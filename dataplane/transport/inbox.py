"""The receiving end of every transport: one ZeroMQ socket, tensors read back the way each was sent."""

from __future__ import annotations

import msgspec
import torch
import zmq

from common.errors import TransportError
from dataplane.transport.base import DTYPES_BY_NAME, FrameReader, Message, meta_decoder
from dataplane.transport.cuda_ipc import CudaIpcReader
from dataplane.transport.shm import ShmReader
from dataplane.transport.torch_dist import DistReader


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
            for dtype, shape, where in meta_decoder.decode(frames[1].buffer):
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


def _make_reader(kind: str, device: torch.device):
    if kind == "frame":
        return FrameReader(device)
    if kind == "shm":
        return ShmReader(device)
    if kind == "cuda":
        return CudaIpcReader(device)
    if kind == "dist":
        return DistReader(device)
    raise TransportError(f"a message carries tensors of unknown kind {kind!r}")
