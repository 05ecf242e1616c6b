"""Data-plane transports: shm, tcp, cuda_ipc, nccl and gloo behind one Inbox/Outbox interface."""

from __future__ import annotations

import zmq

from dataplane.transport.base import TRANSPORTS, Message, Outbox, check_transport
from dataplane.transport.inbox import Inbox


def inbox_address(kind: str, session_dir: str, name: str, host: str = "127.0.0.1") -> str:
    """Where a stage binds: an IPC socket in the session's 0700 directory for same-host
    transports, a TCP port (chosen at bind time) for cross-host ones."""
    if check_transport(kind) in ("tcp", "nccl", "gloo"):
        return f"tcp://{host}:0"
    return f"ipc://{session_dir}/{name}.sock"


def open_outbox(
    kind: str,
    context: zmq.Context,
    address: str,
    *,
    device: str = "cpu",
    rank: int = 0,
    dst_rank: int = 0,
    slot_bytes: int = 4 << 20,
    num_slots: int = 16,
) -> Outbox:
    """An Outbox to ``address`` that moves tensors the way ``kind`` does."""
    check_transport(kind)
    if kind == "shm":
        from dataplane.transport.shm import ShmOutbox

        return ShmOutbox(context, address, num_slots=num_slots, slot_bytes=slot_bytes)
    if kind == "cuda_ipc":
        from dataplane.transport.cuda_ipc import CudaIpcOutbox

        return CudaIpcOutbox(context, address, device, num_slots=num_slots, slot_bytes=slot_bytes)
    if kind in ("nccl", "gloo"):
        from dataplane.transport.torch_dist import DistOutbox

        return DistOutbox(context, address, rank, dst_rank)
    return Outbox(context, address)


__all__ = ["TRANSPORTS", "Inbox", "Message", "Outbox", "check_transport", "inbox_address", "open_outbox"]
