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

import msgspec
import torch
import zmq

from common.errors import FlexPipeError
from dataplane import worker_protocol as proto
from dataplane.stage import StageSpec
from dataplane.stage_server import StageServer, set_device
from dataplane.transport import Inbox, inbox_address
POLL_MS = 500


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent exits (no orphans)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class StageWorker:
    """A worker process serving one stage for the ``LLM`` that started it.

    Invariant: the worker serves only after its ``LoadStage`` succeeded; every load
    failure goes back to the supervisor as a readable ``WorkerError``.
    """

    def __init__(self, control_endpoint: str, worker_id: str, session_dir: str, transport: str) -> None:
        self.context = zmq.Context()
        self.control = self.context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.connect(control_endpoint)
        self.worker_id, self.session_dir, self.transport = worker_id, session_dir, transport
        self.inbox = Inbox(self.context, inbox_address(transport, session_dir, f"stage-{worker_id}"))
        self.server: StageServer | None = None
        self.parent_pid = os.getppid()

    def run(self) -> None:
        self._send_control(proto.WorkerHello(self.worker_id, os.getpid(), self.inbox.address))
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        while os.getppid() == self.parent_pid:
            ready = dict(poller.poll(POLL_MS))
            if self.control in ready and not self._handle_control(self.control.recv(), poller):
                break
            if self.server is not None and self.server.inbox.socket in ready:
                self.server.serve_one()
        self.close()

    def _send_control(self, message) -> None:
        self.control.send(proto.encode(message))

    def _handle_control(self, data: bytes, poller: zmq.Poller) -> bool:
        try:
            command = proto.decode(data)
        except msgspec.DecodeError as exc:
            self._send_control(proto.WorkerError(f"malformed control message: {exc}"))
            return True
        if isinstance(command, proto.Shutdown):
            return False
        if isinstance(command, proto.LoadStage):
            self._load(command, poller)
        return True

    def _load(self, command: proto.LoadStage, poller: zmq.Poller) -> None:
        started = time.perf_counter()
        try:
            set_device(command.device)
            if command.transport in ("nccl", "gloo"):
                from dataplane.transport.torch_dist import init_group
                init_group(command.transport, command.dist_init_method, command.stage, command.num_stages)
            spec = StageSpec(command.model_dir, tuple(command.units), command.num_kv_blocks,
                             command.block_size, command.dtype, command.device)
            server = StageServer(self.context, spec, stage=command.stage, num_stages=command.num_stages,
                                 epoch=command.epoch, transport=command.transport, session_dir=self.session_dir,
                                 name=f"stage-{self.worker_id}", inbox=self.inbox)
            server.connect(command.next_address, command.engine_address, command.slot_bytes)
        except Exception as exc:  # any load failure goes back to the supervisor as a readable error
            detail = str(exc) if isinstance(exc, FlexPipeError) else f"{type(exc).__name__}: {exc}"
            self._send_control(proto.WorkerError(f"stage {command.stage} failed to load: {detail}"))
            return
        self.server = server
        poller.register(server.inbox.socket, zmq.POLLIN)
        executor = server.executor
        self._send_control(proto.StageLoaded(command.stage, list(command.units), executor.tensors_read,
                                             executor.param_bytes, executor.kv_bytes, time.perf_counter() - started))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        else:
            self.inbox.close()
        self.control.close(linger=0)
        self.context.term()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FlexPipe stage worker")
    parser.add_argument("--control", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--session-dir", required=True)
    parser.add_argument("--transport", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    StageWorker(args.control, args.worker_id, args.session_dir, args.transport).run()


if __name__ == "__main__":
    main()
