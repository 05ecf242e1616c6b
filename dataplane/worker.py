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
from dataplane import messages, worker_protocol as proto
from dataplane.batch import BatchInput
from dataplane.sampler import sample
from dataplane.stage import StageExecutor, StageSpec
from dataplane.transport import Inbox, inbox_address, open_outbox

log = logging.getLogger("flexpipe.worker")
POLL_MS = 500


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent exits (no orphans)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class StageWorker:
    """One stage's serving loop.

    Invariants: a micro-batch of another epoch is refused, never run; a micro-batch that
    fails is reported to the engine as ``StageFailure`` and the worker keeps serving.
    """

    def __init__(self, control_endpoint: str, worker_id: str, session_dir: str, transport: str) -> None:
        self.context = zmq.Context()
        self.control = self.context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.connect(control_endpoint)
        self.worker_id = worker_id
        self.inbox = Inbox(self.context, inbox_address(transport, session_dir, f"stage-{worker_id}"))
        self.executor: StageExecutor | None = None
        self.load: proto.LoadStage | None = None
        self.next_out = self.engine_out = None
        self.parent_pid = os.getppid()

    def run(self) -> None:
        self._send_control(proto.WorkerHello(self.worker_id, os.getpid(), self.inbox.address))
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.inbox.socket, zmq.POLLIN)
        while os.getppid() == self.parent_pid:
            ready = dict(poller.poll(POLL_MS))
            if self.control in ready and not self._handle_control(self.control.recv()):
                break
            if self.inbox.socket in ready:
                self._handle_data()
        self.close()

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
        if isinstance(command, proto.LoadStage):
            self._load(command)
        return True

    def _load(self, command: proto.LoadStage) -> None:
        started = time.perf_counter()
        try:
            if command.device.startswith("cuda"):
                torch.cuda.set_device(torch.device(command.device))
            if command.transport in ("nccl", "gloo"):
                from dataplane.transport.torch_dist import init_group
                init_group(command.transport, command.dist_init_method, command.stage, command.num_stages)
            spec = StageSpec(command.model_dir, tuple(command.units), command.num_kv_blocks,
                             command.block_size, command.dtype, command.device)
            self.executor = StageExecutor(spec)
            self.load = command
            if command.stage < command.num_stages - 1:
                self.next_out = open_outbox(command.transport, self.context, command.next_address,
                                            device=command.device, rank=command.stage,
                                            dst_rank=command.stage + 1, slot_bytes=command.slot_bytes)
            self.engine_out = open_outbox("tcp", self.context, command.engine_address)
        except Exception as exc:  # any load failure goes back to the supervisor as a readable error
            detail = str(exc) if isinstance(exc, FlexPipeError) else f"{type(exc).__name__}: {exc}"
            self._send_control(proto.WorkerError(f"stage {command.stage} failed to load: {detail}"))
            return
        executor = self.executor
        self._send_control(proto.StageLoaded(command.stage, list(command.units), executor.tensors_read,
                                             executor.param_bytes, executor.kv_bytes, time.perf_counter() - started))

    def _handle_data(self) -> None:
        message = self.inbox.recv()
        batch_id = -1
        try:
            header = messages.decode(message.header)
            if not isinstance(header, messages.MicroBatch) or self.executor is None:
                raise FlexPipeError("stage received a message it cannot serve")
            batch_id = header.batch_id
            if header.epoch != self.load.epoch:
                raise FlexPipeError(f"micro-batch of epoch {header.epoch} refused by stage serving epoch {self.load.epoch}")
            self._forward(header, message)
        except Exception as exc:  # a failed micro-batch is reported, the stage keeps serving
            log.error("micro-batch %s failed: %s", batch_id, traceback.format_exc())
            if self.engine_out is not None:
                stage = self.load.stage if self.load else -1
                self.engine_out.send(messages.encode(messages.StageFailure(batch_id, stage, f"{type(exc).__name__}: {exc}")))
        finally:
            message.release()

    def _forward(self, header: messages.MicroBatch, message) -> None:
        seqs = header.seqs
        batch = BatchInput.build([s.token_ids for s in seqs], [s.start for s in seqs],
                                 [s.block_table for s in seqs], self.load.block_size, self.executor.device)
        hidden = message.tensors[0] if message.tensors else None
        out = self.executor.forward(batch, hidden)
        if self.next_out is not None:
            self.next_out.send(message.header, [out])
            return
        tokens, logprobs = sample(out, [s.sampling for s in seqs], [s.step for s in seqs])
        reply = messages.SampledTokens(header.batch_id, header.epoch, [s.seq_id for s in seqs], tokens, logprobs)
        self.engine_out.send(messages.encode(reply))

    def close(self) -> None:
        for outbox in (self.next_out, self.engine_out):
            if outbox is not None:
                outbox.close()
        self.inbox.close()
        self.control.close(linger=0)
        if self.load is not None and self.load.transport in ("nccl", "gloo"):
            from dataplane.transport.torch_dist import close_group
            close_group()
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
