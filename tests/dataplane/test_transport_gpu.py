"""GPU transports over real processes: CUDA IPC on one device and NCCL point-to-point between two.

Skipped unless CUDA is available (NCCL additionally needs two devices: NCCL wants one
device per rank). Children are started with the "spawn" method (CUDA cannot be used
after fork), every wait is bounded, and children still alive after a test are killed.
"""

from __future__ import annotations

import gc
import os
import traceback

import pytest
import torch
import zmq
from transport_support import SPAWN, assert_same, free_port, queue_get, spawned

from common.errors import TransportError
from common.runtime import shared_memory_dir
from dataplane.transport import Inbox, inbox_address, open_outbox

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

RECV_MS = 60_000
CHILD_JOIN_S = 90


# ----------------------------------------------------------------------------- helpers


def expected_tensors(seed: int) -> list[torch.Tensor]:
    """CPU reference values of message ``seed``: several dtypes, empty, 0-dim and a strided view."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(3, 5, generator=g),
        torch.randn(4, 7, generator=g).to(torch.bfloat16),
        torch.randint(-(2**40), 2**40, (11,), generator=g),
        torch.empty(0, 4),
        torch.randn(6, 8, generator=g)[::2, 1::3],
        torch.randint(0, 256, (3,), dtype=torch.uint8, generator=g),
        torch.tensor(float(seed) + 0.25, dtype=torch.float64),
        torch.randn(2, 3, generator=g).to(torch.float16),
    ]


def device_tensors(seed: int, device: str) -> list[torch.Tensor]:
    """The values of ``expected_tensors(seed)`` on ``device``; the strided one stays strided there."""
    tensors = expected_tensors(seed)
    result = [t.to(device) for t in tensors]
    full = torch.zeros(6, 8, dtype=tensors[4].dtype, device=device)
    full[::2, 1::3] = tensors[4].to(device)
    result[4] = full[::2, 1::3]
    assert not result[4].is_contiguous()
    return result


# ----------------------------------------------------------------------------- CUDA IPC

CUDA_COUNT = 6
CUDA_SLOT_BYTES = 1 << 20


def _cuda_ipc_sender(address: str, results, done) -> None:
    """Child: sends CUDA tensors through a 2-slot CudaIpcOutbox on cuda:0."""
    context = zmq.Context()
    outbox = None
    try:
        torch.cuda.set_device(0)
        outbox = open_outbox("cuda_ipc", context, address, device="cuda:0", num_slots=2, slot_bytes=CUDA_SLOT_BYTES)
        results.put(("pid", os.getpid()))
        outbox.send(b"0", device_tensors(0, "cuda:0"))
        outbox.send(b"1", device_tensors(1, "cuda:0"))
        # the parent holds messages 0 and 1 unreleased: both slots are busy
        outbox.timeout_s = 0.5
        try:
            outbox.send(b"2", device_tensors(2, "cuda:0"))
            blocked = False
        except TransportError:
            blocked = True
        outbox.timeout_s = 60.0
        results.put(("blocked", blocked))
        for i in range(2, CUDA_COUNT):
            outbox.send(str(i).encode(), device_tensors(i, "cuda:0"))
        # larger than a slot: travels inline, arrives on the receiver's device all the same
        outbox.send(b"big", [torch.arange(CUDA_SLOT_BYTES // 2, dtype=torch.int64, device="cuda:0")])
        outbox.send(b"end")
        results.put(("sent", CUDA_COUNT))
        done.wait(CHILD_JOIN_S)
    except BaseException:
        results.put(("error", traceback.format_exc()))
    finally:
        if outbox is not None:
            outbox.close()
        context.destroy(linger=0)


def _inside_any(tensor: torch.Tensor, buffers) -> bool:
    return any(b.data_ptr() <= tensor.data_ptr() < b.data_ptr() + b.numel() for b in buffers)


@pytest.mark.timeout(300)
def test_cuda_ipc_round_trip_between_processes(context, session_dir):
    device = torch.device("cuda:0")
    inbox = Inbox(context, inbox_address("cuda_ipc", session_dir, "gpu"), device="cuda:0")
    results, done = SPAWN.Queue(), SPAWN.Event()
    try:
        with spawned((_cuda_ipc_sender, (inbox.address, results, done)), join_s=CHILD_JOIN_S) as (child,):
            child_pid = queue_get(results, "pid")
            held = [inbox.recv(RECV_MS), inbox.recv(RECV_MS)]
            for i, message in enumerate(held):
                assert message is not None and message.header == str(i).encode()
                assert_same(expected_tensors(i), message.tensors, device)
            # zero-copy: the tensors are views of the sender's slot buffers opened via IPC
            buffers = list(inbox._readers["cuda"].buffers.values())
            assert len(buffers) == 2
            for message in held:
                for tensor in message.tensors:
                    if tensor.numel():
                        assert _inside_any(tensor, buffers)

            assert queue_get(results, "blocked") is True, "a slot was reused before its release"
            assert_same(expected_tensors(0), held[0].tensors, device)  # not overwritten meanwhile
            for message in held:
                message.release()
            del held, message, tensor

            for i in range(2, CUDA_COUNT):
                message = inbox.recv(RECV_MS)
                assert message is not None, f"message {i} did not arrive"
                assert message.header == str(i).encode()
                assert_same(expected_tensors(i), message.tensors, device)
                message.release()
            big = inbox.recv(RECV_MS)
            assert big.header == b"big"
            assert_same([torch.arange(CUDA_SLOT_BYTES // 2, dtype=torch.int64)], big.tensors, device)
            end = inbox.recv(RECV_MS)
            assert end.header == b"end" and end.tensors == []
            assert queue_get(results, "sent") == CUDA_COUNT

            # drop every view of the child's memory before it frees it
            del message, big, end, buffers
            inbox.close()
            gc.collect()
            torch.cuda.synchronize()
            done.set()
            child.join(CHILD_JOIN_S)
            assert child.exitcode == 0
        assert not list(shared_memory_dir().glob(f"flexpipe-{child_pid}-*")), "the child's flag file was removed"
    finally:
        done.set()
        inbox.close()
        results.close()
        results.join_thread()


# ----------------------------------------------------------------------------- NCCL

NCCL_PLAN = [(b"n0", 0), (b"n-header-only", None), (b"n1", 1), (b"n2", 2)]


def _nccl_rank(rank: int, init_method: str, addresses, results) -> None:
    """Child: rank ``r`` runs on cuda:r; rank 0 sends to rank 1's Inbox, rank 1 checks."""
    import torch.distributed as dist

    from dataplane.transport import torch_dist

    context = zmq.Context()
    box = None
    try:
        torch.cuda.set_device(rank)
        device = torch.device(f"cuda:{rank}")
        torch_dist.init_group("nccl", init_method, rank, 2, timeout_s=120)
        if rank == 1:
            box = Inbox(context, inbox_address("nccl", "", "rank1"), device="cuda:1")
            addresses.put(box.address)
            for header, seed in NCCL_PLAN:
                message = box.recv(RECV_MS)
                if message is None:
                    raise AssertionError(f"message {header!r} did not arrive")
                if message.header != header:
                    raise AssertionError(f"got header {message.header!r}, expected {header!r}")
                assert_same([] if seed is None else expected_tensors(seed), message.tensors, device)
                message.release()
            if box.recv(100) is not None:
                raise AssertionError("an unexpected extra message arrived")
        else:
            box = open_outbox("nccl", context, addresses.get(timeout=120), device="cuda:0", rank=0, dst_rank=1)
            for header, seed in NCCL_PLAN:
                box.send(header, [] if seed is None else device_tensors(seed, "cuda:0"))
        torch.cuda.synchronize()
        dist.barrier(device_ids=[rank])
        results.put(("ok", rank))
    except BaseException:
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
    finally:
        if box is not None:
            box.close()
        context.destroy(linger=0)
        torch_dist.close_group()


@pytest.mark.timeout(400)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL point-to-point needs one device per rank (2 GPUs)")
def test_nccl_point_to_point_between_processes():
    init_method = f"tcp://127.0.0.1:{free_port()}"
    addresses, results = SPAWN.Queue(), SPAWN.Queue()
    try:
        with spawned(
            (_nccl_rank, (0, init_method, addresses, results)),
            (_nccl_rank, (1, init_method, addresses, results)),
            join_s=CHILD_JOIN_S,
        ) as ranks:
            reported = sorted(queue_get(results, "ok", timeout_s=240) for _ in ranks)
            assert reported == [0, 1]
            for process in ranks:
                process.join(CHILD_JOIN_S)
            assert [p.exitcode for p in ranks] == [0, 0]
    finally:
        for q in (addresses, results):
            q.close()
            q.join_thread()
