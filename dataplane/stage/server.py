"""One loaded stage serving micro-batches: inbox in, residual stream or sampled tokens out."""

from __future__ import annotations

import logging
import time
import traceback

import torch
import zmq

from common.errors import FlexPipeError
from dataplane.models.batch import BatchInput
from dataplane.stage.executor import StageExecutor, StageSpec
from dataplane.stage.sampler import sample
from dataplane.transport import Inbox, inbox_address, messages, open_outbox

log = logging.getLogger("flexpipe.stage")


class StageServer:
    """Serves stage ``stage`` of ``num_stages`` for one epoch of a pipeline.

    Invariants: a micro-batch of another epoch is refused, never run; a micro-batch that
    fails is reported to the engine as ``StageFailure`` and the server keeps serving;
    nothing is sent before ``connect`` named the successor and the engine.
    """

    def __init__(
        self,
        context: zmq.Context,
        spec: StageSpec,
        *,
        stage: int,
        num_stages: int,
        epoch: int,
        transport: str,
        session_dir: str,
        name: str,
        inbox: Inbox | None = None,
        executor: StageExecutor | None = None,
    ) -> None:
        self.context, self.spec = context, spec
        self.stage, self.num_stages, self.epoch, self.transport = stage, num_stages, epoch, transport
        self.executor = executor or StageExecutor(spec)
        self.inbox = inbox or Inbox(context, inbox_address(transport, session_dir, name), device=spec.device)
        self.next_out = self.engine_out = None
        self.busy_seconds = 0.0
        self.tokens_processed = 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def connect(self, next_address: str, engine_address: str, slot_bytes: int) -> None:
        if not self.is_last:
            self.next_out = open_outbox(
                self.transport,
                self.context,
                next_address,
                device=self.spec.device,
                rank=self.stage,
                dst_rank=self.stage + 1,
                slot_bytes=slot_bytes,
            )
        self.engine_out = open_outbox("tcp", self.context, engine_address)

    def serve_one(self) -> None:
        """Receive one message (one is ready) and answer it."""
        self.serve(self.inbox.recv())

    def serve(self, message, header=None) -> None:
        """Answer one received message (its header decoded already, or not) and release it."""
        started = time.perf_counter()
        batch_id = -1
        try:
            header = header or messages.decode(message.header)
            if not isinstance(header, messages.MicroBatch):
                raise FlexPipeError("stage received a message it cannot serve")
            batch_id = header.batch_id
            if header.epoch != self.epoch:
                raise FlexPipeError(f"micro-batch of epoch {header.epoch} refused by stage serving epoch {self.epoch}")
            if self.engine_out is None:
                raise FlexPipeError(f"stage {self.stage} is not connected yet")
            self._forward(header, message)
        except Exception as exc:  # a failed micro-batch is reported, the stage keeps serving
            log.error("micro-batch %s failed: %s", batch_id, traceback.format_exc())
            self.fail(batch_id, f"{type(exc).__name__}: {exc}")
        finally:
            message.release()
            self.busy_seconds += time.perf_counter() - started

    def fail(self, batch_id: int, reason: str) -> None:
        """Tell the engine this stage could not serve micro-batch ``batch_id``."""
        if self.engine_out is not None:
            self.engine_out.send(messages.encode(messages.StageFailure(batch_id, self.stage, reason)))

    def _forward(self, header: messages.MicroBatch, message) -> None:
        seqs = header.seqs
        batch = BatchInput.build(
            [s.token_ids for s in seqs],
            [s.start for s in seqs],
            [s.block_table for s in seqs],
            self.spec.block_size,
            self.executor.device,
        )
        self.tokens_processed += batch.num_tokens
        hidden = message.tensors[0] if message.tensors else None
        batch.adopt(message.tensors[1:])
        out = self.executor.forward(batch, hidden)
        if self.next_out is not None:
            self.next_out.send(message.header, [out, *batch.shared_tensors()])
            return
        tokens, logprobs, failures = sample(out, [s.sampling for s in seqs], [s.step for s in seqs])
        reply = messages.SampledTokens(
            header.batch_id,
            header.epoch,
            [s.seq_id for s in seqs],
            tokens,
            logprobs,
            {seqs[row].seq_id: reason for row, reason in failures.items()},
        )
        self.engine_out.send(messages.encode(reply))

    def close(self, keep_inbox: bool = False) -> None:
        """Close the outboxes, and the inbox unless another epoch's server goes on reading it."""
        for outbox in (self.next_out, self.engine_out):
            if outbox is not None:
                outbox.close()
        self.next_out = self.engine_out = None
        if keep_inbox:
            return
        self.inbox.close()
        if self.transport in ("nccl", "gloo"):
            from dataplane.transport.torch_dist import close_group

            close_group()


def set_device(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
