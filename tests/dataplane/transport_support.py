"""Helpers shared by the transport tests: tensor comparison, ports, spawned children."""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import socket
import time

import pytest
import torch

from common.runtime import shared_memory_dir

SPAWN = multiprocessing.get_context("spawn")


def assert_same(expected: list[torch.Tensor], got: list[torch.Tensor], device: torch.device | None = None) -> None:
    assert len(got) == len(expected)
    for index, (want, have) in enumerate(zip(expected, got)):
        if device is not None:
            assert have.device == device, f"tensor {index} on {have.device}, expected {device}"
        assert have.dtype == want.dtype, f"tensor {index}: dtype {have.dtype} != {want.dtype}"
        assert tuple(have.shape) == tuple(want.shape), (
            f"tensor {index}: shape {tuple(have.shape)} != {tuple(want.shape)}"
        )
        assert torch.equal(have.cpu(), want.cpu()), f"tensor {index}: values differ: {have.tolist()} != {want.tolist()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def queue_get(q, what: str, timeout_s: float = 60.0):
    """The next item of a child's result queue; a child's reported traceback fails the test."""
    try:
        item = q.get(timeout=timeout_s)
    except queue.Empty:
        pytest.fail(f"no {what!r} from the child process within {timeout_s:.0f}s")
    if item[0] == "error":
        pytest.fail(f"child process failed:\n{item[1]}")
    assert item[0] == what, f"expected {what!r} from the child, got {item!r}"
    return item[1]


@contextlib.contextmanager
def spawned(*targets, join_s: float = 60.0):
    """Starts spawn-context processes; on exit joins them (bounded) and kills any still alive."""
    processes = [SPAWN.Process(target=fn, args=args, daemon=True) for fn, args in targets]
    try:
        for process in processes:
            process.start()
        yield processes
    finally:
        deadline = time.monotonic() + join_s
        for process in processes:
            if process.pid is None:
                continue
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
                for ring in shared_memory_dir().glob(f"flexpipe-{process.pid}-*"):
                    ring.unlink(missing_ok=True)  # a killed child cannot remove its own ring
