"""torch.distributed point-to-point transport: NCCL between GPUs (any host), gloo between CPU hosts.

The header goes over ZeroMQ first; the tensors follow as ``send``/``recv`` pairs
between the two ranks, in header order, so the receiver always knows shape, dtype
and source before it posts a receive.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import zmq

from common.errors import TransportError
from dataplane.transport.base import DTYPE_NAMES, Outbox

BACKENDS = {"nccl": "nccl", "gloo": "gloo"}


def init_group(backend: str, init_method: str, rank: int, world_size: int, timeout_s: float = 60.0) -> None:
    """Joins this process to the pipeline's process group (one rank per stage)."""
    if backend == "nccl" and not torch.cuda.is_available():
        raise TransportError("transport 'nccl' needs CUDA devices; use 'gloo' or 'tcp' on CPU hosts")
    if dist.is_initialized():
        return
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class DistOutbox(Outbox):
    """Header over ZeroMQ, then each tensor by ``dist.send`` to ``dst_rank``."""

    def __init__(
        self, context: zmq.Context, address: str, src_rank: int, dst_rank: int, timeout_s: float = 30.0
    ) -> None:
        super().__init__(context, address, timeout_s)
        self.src_rank, self.dst_rank = src_rank, dst_rank

    def _place(self, tensors):
        tensors = [t.detach().contiguous() for t in tensors]
        meta = [[DTYPE_NAMES[t.dtype], list(t.shape), ["dist", self.src_rank]] for t in tensors]

        def send_tensors() -> None:
            for tensor in tensors:
                dist.send(tensor, dst=self.dst_rank)

        return meta, [], send_tensors


class DistReader:
    """Receives each announced tensor from its source rank into a fresh buffer on this device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def read(self, dtype, shape, where, frames):
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(tensor, src=where[1])
        return tensor, None

    def close(self) -> None:
        pass
