"""A stage worker process: receives micro-batches, runs its units, passes the residual stream on.

Run as ``python -m dataplane.worker --control ENDPOINT --worker-id ID``. The worker
binds its data inbox, says hello on the control socket, loads the stage it is told
to serve, and then serves until told to shut down or its parent process exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback

import msgspec
import torch
import zmq

from common.errors import FlexPipeError
from common.runtime import freeze_heap
from dataplane import worker_protocol as proto
from dataplane.param_cache import ParamCache
from dataplane.stage_epochs import StageEpochs
from dataplane.stage_server import set_device
from dataplane.transport import Inbox, inbox_address

POLL_MS = 500
DEFAULT_PARAM_CACHE_BYTES = 1 << 30
log = logging.getLogger("flexpipe.worker")


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent exits (no orphans)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class StageWorker:
    """A worker process serving stages for the ``LLM`` that started it, epoch after epoch.

    Invariants: the worker serves only a stage whose load or prepare succeeded; every
    failure of a command goes back to the supervisor as a readable ``WorkerError``
    carrying the command's epoch; queued KV sends never delay a waiting micro-batch
    by more than one chunk.
    """

    def __init__(self, control_endpoint: str, worker_id: str, session_dir: str, transport: str,
                 param_cache_bytes: int = DEFAULT_PARAM_CACHE_BYTES) -> None:
        self.context = zmq.Context()
        self.control = self.context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.connect(control_endpoint)
        self.worker_id = worker_id
        self.inbox = Inbox(self.context, inbox_address(transport, session_dir, f"stage-{worker_id}"))
        self.epochs = StageEpochs(self.context, self.inbox, session_dir, transport, worker_id, self._send_control,
                                  ParamCache(param_cache_bytes))
        self.parent_pid = os.getppid()

    def run(self) -> None:
        freeze_heap()
        self._send_control(proto.WorkerHello(self.worker_id, os.getpid(), self.inbox.address))
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.inbox.socket, zmq.POLLIN)
        wait_ms = POLL_MS
        while os.getppid() == self.parent_pid:
            ready = dict(poller.poll(wait_ms))
            if self.control in ready and not self._handle_control(self.control.recv()):
                break
            if self.inbox.socket in ready:
                self._serve_one()
            due = self.epochs.pump()
            wait_ms = POLL_MS if due is None else min(POLL_MS, int(due * 1000))
        self.close()

    def _serve_one(self) -> None:
        try:
            message = self.inbox.recv()
        except FlexPipeError as exc:
            log.error("dropping an unreadable data message: %s", exc)
            return
        self.epochs.on_data(message)

    def _send_control(self, message) -> None:
        self.control.send(proto.encode(message))

    def _handle_control(self, data: bytes) -> bool:
        try:
            command = proto.decode(data)
        except msgspec.DecodeError as exc:
            self._send_control(proto.WorkerError(f"malformed control message: {exc}"))
            return True
        if isinstance(command, proto.Shutdown):
            return False
        epoch = getattr(command, "epoch", -1)
        try:
            self._dispatch(command)
        except Exception as exc:  # any failure goes back to the supervisor as a readable error
            detail = str(exc) if isinstance(exc, FlexPipeError) else f"{type(exc).__name__}: {exc}"
            if isinstance(command, proto.LoadStage):
                detail = f"stage {command.stage} failed to load: {detail}"
            log.error("%s failed: %s", type(command).__name__, traceback.format_exc())
            self._send_control(proto.WorkerError(detail, epoch))
        return True

    def _dispatch(self, command) -> None:
        epochs = self.epochs
        if isinstance(command, proto.LoadStage):
            started = time.perf_counter()
            set_device(command.device)
            if command.transport in ("nccl", "gloo"):
                from dataplane.transport.torch_dist import init_group
                init_group(command.transport, command.dist_init_method, command.stage, command.num_stages)
            executor = epochs.load(command).executor
            self._send_control(proto.StageLoaded(command.stage, list(command.units), executor.tensors_read,
                                                 executor.param_bytes, executor.kv_bytes, time.perf_counter() - started))
        elif isinstance(command, proto.PrepareStage):
            set_device(command.device)
            epochs.prepare(command)
        elif isinstance(command, proto.SendUnits):
            epochs.send_units(command)
        elif isinstance(command, proto.PrecopyKv):
            epochs.precopy(command)
        elif isinstance(command, proto.ActivateEpoch):
            epochs.activate(command)
        elif isinstance(command, proto.CommitEpoch):
            self._send_control(proto.EpochSettled(command.epoch, "committed", epochs.commit(command.epoch)))
        elif isinstance(command, proto.AbortEpoch):
            epochs.abort(command.epoch)
            self._send_control(proto.EpochSettled(command.epoch, "aborted", []))

    def close(self) -> None:
        self.epochs.close()
        self.control.close(linger=0)
        self.context.term()


def warm_meta_device():
    """The first op on the ``meta`` device imports its kernels (about a second); pay that at start-up,
    not when a refactor builds a unit received from a peer. Returns the thread doing it."""
    import threading
    warm = lambda: torch.cat([torch.empty(1, device="meta")] * 2)  # noqa: E731
    thread = threading.Thread(target=warm, name="warm-meta", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FlexPipe stage worker")
    parser.add_argument("--control", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--session-dir", required=True)
    parser.add_argument("--transport", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--param-cache-bytes", type=int, default=DEFAULT_PARAM_CACHE_BYTES)
    args = parser.parse_args(argv)
    die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warming = warm_meta_device()
    try:
        StageWorker(args.control, args.worker_id, args.session_dir, args.transport, args.param_cache_bytes).run()
    finally:
        warming.join(10.0)  # a C++ thread still running at interpreter exit aborts the process


if __name__ == "__main__":
    main()
