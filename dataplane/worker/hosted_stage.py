"""One pipeline's stage on a cluster worker, epoch after epoch, driven by control-bus commands."""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

import zmq

from common import events as ev
from common.errors import PipelineError, TransportError
from common.logging import emit, get_logger
from dataplane.stage.epochs import StageEpochs
from dataplane.stage.executor import StageSpec
from dataplane.stage.param_cache import ParamCache
from dataplane.stage.server import StageServer, set_device
from dataplane.transport import Inbox, inbox_address
from dataplane.worker.epoch_replies import ACTIVATED, PREPARED, EpochReplies


class HostedStage:
    """What a cluster worker serves of one pipeline: a ``StageEpochs`` behind one data inbox, the
    messages queued for it, and the counters its metrics come from.

    Invariants: micro-batches reach only the active stage; a command of an epoch at or below
    the newest one this worker settled (or serves, for a prepare) is refused, naming both
    epochs; deferred commands are answered once (``EpochReplies``); ``close`` releases the
    queued messages, every stage and the inbox.
    """

    def __init__(
        self,
        context: zmq.Context,
        pipeline_id: str,
        epoch: int,
        transport: str,
        worker_id: str,
        session_dir: str,
        device: str,
        send: Callable[[ev.Event], None],
        param_cache_bytes: int,
    ) -> None:
        self.pipeline_id, self.worker_id, self.device = pipeline_id, worker_id, device
        inbox = Inbox(context, inbox_address(transport, session_dir, pipeline_id), device=device)
        self.replies = EpochReplies(worker_id, pipeline_id, send)
        self.epochs = StageEpochs(
            context, inbox, session_dir, transport, worker_id, self.replies, ParamCache(param_cache_bytes)
        )
        self.settled_epoch = epoch - 1
        self.queue: deque = deque()
        self.unreadable_epochs: set[int] = set()  # epochs already failed for an unreadable message
        self.reported_at = time.monotonic()
        self.reported_busy = 0.0
        self.reported_tokens = 0
        self.reported_server: StageServer | None = None
        self.log = get_logger(worker_id=worker_id)

    @property
    def inbox(self) -> Inbox:
        return self.epochs.inbox

    @property
    def busy(self) -> bool:
        """Serves a stage now or has one prepared."""
        return self.epochs.active is not None or self.epochs.pending is not None

    # ---- serving -------------------------------------------------------------------------

    def load(self, command: ev.LoadStage) -> StageServer:
        spec = StageSpec(
            command.model_dir,
            tuple(command.units),
            command.num_kv_blocks,
            command.block_size,
            command.dtype,
            self.device,
        )
        server = StageServer(
            self.epochs.context,
            spec,
            stage=command.stage,
            num_stages=command.num_stages,
            epoch=command.epoch,
            transport=command.transport,
            session_dir=self.epochs.session_dir,
            name=f"{command.pipeline_id}-{command.stage}",
            inbox=self.inbox,
        )
        self.epochs.active, self.settled_epoch = server, command.epoch
        return server

    def connect(self, command: ev.ConnectStage) -> None:
        if self.epochs.active is None:
            raise PipelineError(f"{self.worker_id} serves no stage of pipeline {self.pipeline_id} to connect")
        self.epochs.active.connect(command.next_address, command.engine_address, command.slot_bytes)
        self.epochs.slot_bytes = command.slot_bytes

    def receive(self) -> None:
        """Queue every message waiting; one that cannot be read (e.g. it points into a shared-memory ring its
        sender removed after giving up) is dropped and fails the epoch being prepared, never the worker."""
        while True:
            try:
                message = self.inbox.recv(0)
            except TransportError as exc:
                self._unreadable(exc)
                continue
            if message is None:
                return
            self.queue.append(message)

    def _unreadable(self, exc: TransportError) -> None:
        emit(self.log, "stage.message_unreadable", level="error", pipeline_id=self.pipeline_id, reason=str(exc))
        pending = self.epochs.pending
        if pending is not None and pending.command.epoch not in self.unreadable_epochs:
            self.unreadable_epochs.add(pending.command.epoch)
            self.replies.failed(pending.command.epoch, f"a message from a peer could not be read: {exc}")

    def serve_next(self) -> None:
        """Hand the oldest queued data message to the stages; a failure of epoch work is reported, not raised."""
        try:
            self.epochs.on_data(self.queue.popleft())
        except Exception as exc:  # e.g. a stage built from received weights failed: its prepare is answered
            pending = self.epochs.pending
            epoch = pending.command.epoch if pending is not None else -1
            self.replies.failed(epoch, f"{type(exc).__name__}: {exc}")

    def metrics(self) -> ev.StageMetrics | None:
        server = self.epochs.active
        if server is None:
            return None
        now = time.monotonic()
        if server is not self.reported_server:  # a new epoch's server counts from zero
            self.reported_server, self.reported_busy, self.reported_tokens = server, 0.0, 0
        elapsed = max(1e-6, now - self.reported_at)
        busy = (server.busy_seconds - self.reported_busy) / elapsed
        tokens = (server.tokens_processed - self.reported_tokens) / elapsed
        self.reported_at, self.reported_busy, self.reported_tokens = now, server.busy_seconds, server.tokens_processed
        return ev.StageMetrics(
            pipeline_id=self.pipeline_id,
            epoch=server.epoch,
            stage=server.stage,
            queue_length=len(self.queue),
            busy_fraction=round(min(1.0, max(0.0, busy)), 4),
            kv_blocks_used=0,
            kv_blocks_free=server.spec.num_kv_blocks,
            tokens_per_s=round(tokens, 1),
        )

    # ---- epochs ----------------------------------------------------------------------------

    def prepare(self, command: ev.PrepareStageEpoch) -> None:
        """Start building the stage of ``command.epoch``; its ``StageEpochPrepared`` follows when built."""
        active = self.epochs.active
        self._refuse_stale(command, max(self.settled_epoch, active.epoch if active is not None else -1))
        set_device(self.device)
        self.replies.defer(command, PREPARED)
        try:
            self.epochs.prepare(command, self.device)
        except BaseException:
            self.replies.cancel(command)
            raise

    def send_units(self, command: ev.SendStageUnits) -> None:
        self._refuse_stale(command, self.settled_epoch)
        self.epochs.send_units(command)

    def copy_kv(self, command: ev.CopyStageKv) -> None:
        self._refuse_stale(command, self.settled_epoch)
        self.epochs.precopy(command)

    def activate(self, command: ev.ActivateStageEpoch) -> None:
        """Switch once the expected KV landed; its ``StageEpochActivated`` follows then."""
        self._refuse_stale(command, self.settled_epoch)
        self.replies.defer(command, ACTIVATED)
        try:
            self.epochs.activate(
                command.epoch, {t.transfer_id: t.num_slots for t in command.expect}, command.after_seal
            )
        except BaseException:
            self.replies.cancel(command)
            raise

    def commit(self, command: ev.CommitStageEpoch) -> list[str]:
        self._refuse_stale(command, self.settled_epoch, repeat_ok=True)
        cached = self.epochs.commit(command.epoch)
        self.settled_epoch = max(self.settled_epoch, command.epoch)
        emit(
            self.log,
            "stage.epoch_settled",
            pipeline_id=self.pipeline_id,
            epoch=command.epoch,
            outcome="committed",
            cached_units=cached,
        )
        return cached

    def abort(self, command: ev.AbortStageEpoch) -> None:
        self._refuse_stale(command, self.settled_epoch)
        self.epochs.abort(command.epoch)
        self.replies.drop_epoch(command.epoch, "the epoch was aborted")
        emit(
            self.log,
            "stage.epoch_settled",
            pipeline_id=self.pipeline_id,
            epoch=command.epoch,
            outcome="aborted",
            cached_units=[],
        )

    def _refuse_stale(self, command: ev.Command, newest: int, repeat_ok: bool = False) -> None:
        if command.epoch < newest or (command.epoch == newest and not repeat_ok):
            raise PipelineError(
                f"{type(command).__name__} for epoch {command.epoch} of pipeline {self.pipeline_id} is "
                f"stale: {self.worker_id} is already at epoch {newest}"
            )

    def close(self) -> None:
        self.replies.drop_all(f"pipeline {self.pipeline_id} was unloaded from {self.worker_id}")
        while self.queue:
            self.queue.popleft().release()
        self.epochs.close()
