"""A worker's answers about epochs: what ``StageEpochs`` finished on its own time, as bus events."""

from __future__ import annotations

from typing import Callable

from common import events as ev
from common.logging import emit, get_logger

PREPARED, ACTIVATED = "prepared", "activated"


class EpochReplies:
    """The ``EpochListener`` of one pipeline's ``StageEpochs`` on a worker.

    Invariants: a deferred command (``PrepareStageEpoch``, ``ActivateStageEpoch``) is answered
    exactly once, by its reply (``reply_to`` its ``cmd_id``) or by an ``ErrorReply`` when its
    epoch fails, is aborted, or the command is superseded; KV that landed here and failures of
    work already acknowledged are announced as events; ``send`` is only ever called from the
    thread that calls this object.
    """

    def __init__(self, worker_id: str, pipeline_id: str, send: Callable[[ev.Event], None]) -> None:
        self.worker_id, self.pipeline_id, self.send = worker_id, pipeline_id, send
        self.deferred: dict[tuple[str, int], ev.Command] = {}
        self.log = get_logger(worker_id=worker_id)

    def defer(self, command: ev.Command, answered_by: str) -> None:
        """Remember ``command`` until its epoch is ``answered_by`` (``PREPARED`` or ``ACTIVATED``)."""
        key = (answered_by, command.epoch)
        earlier = self.deferred.pop(key, None)
        if earlier is not None:
            self._error(earlier, f"superseded by command {command.cmd_id} for epoch {command.epoch}")
        self.deferred[key] = command

    def cancel(self, command: ev.Command) -> None:
        """Forget ``command`` without answering it (its caller answers it)."""
        for key, waiting in list(self.deferred.items()):
            if waiting is command:
                del self.deferred[key]

    def kv_received(self, epoch: int, transfer_id: int, num_slots: int, nbytes: int) -> None:
        self.send(
            ev.StageKvCopied(
                sender=self.worker_id,
                pipeline_id=self.pipeline_id,
                epoch=epoch,
                worker_id=self.worker_id,
                transfer_id=transfer_id,
                num_slots=num_slots,
                nbytes=nbytes,
            )
        )

    def failed(self, epoch: int, reason: str) -> None:
        """Epoch ``epoch`` cannot go on here: its deferred commands get an error, or, with none waiting,
        an event says so."""
        emit(self.log, "stage.epoch_failed", level="error", pipeline_id=self.pipeline_id, epoch=epoch, reason=reason)
        waiting = [key for key in self.deferred if key[1] == epoch]
        for key in waiting:
            self._error(self.deferred.pop(key), reason)
        if not waiting:
            self.send(
                ev.StageEpochFailed(
                    sender=self.worker_id,
                    pipeline_id=self.pipeline_id,
                    epoch=epoch,
                    worker_id=self.worker_id,
                    reason=reason,
                )
            )

    def drop_epoch(self, epoch: int, reason: str) -> None:
        """Answer the commands still waiting on ``epoch`` with ``reason`` (it was aborted or unloaded)."""
        for key in [key for key in self.deferred if key[1] == epoch]:
            self._error(self.deferred.pop(key), reason)

    def drop_all(self, reason: str) -> None:
        for command in self.deferred.values():
            self._error(command, reason)
        self.deferred.clear()

    def prepared(
        self,
        epoch: int,
        stage: int,
        sources: dict[str, str],
        bytes_by_source: dict[str, int],
        kv_bytes_allocated: int,
        seconds: float,
    ) -> None:
        command = self.deferred.pop((PREPARED, epoch), None)
        emit(
            self.log,
            "stage.epoch_prepared",
            pipeline_id=self.pipeline_id,
            epoch=epoch,
            stage=stage,
            sources=sources,
            seconds=round(seconds, 3),
        )
        if command is not None:
            self.send(
                ev.StageEpochPrepared(
                    sender=self.worker_id,
                    reply_to=command.cmd_id,
                    pipeline_id=self.pipeline_id,
                    epoch=epoch,
                    stage=stage,
                    sources=sources,
                    bytes_by_source=bytes_by_source,
                    kv_bytes_allocated=kv_bytes_allocated,
                    seconds=seconds,
                )
            )

    def activated(self, epoch: int) -> None:
        command = self.deferred.pop((ACTIVATED, epoch), None)
        emit(self.log, "stage.epoch_activated", pipeline_id=self.pipeline_id, epoch=epoch)
        if command is not None:
            self.send(
                ev.StageEpochActivated(
                    sender=self.worker_id, reply_to=command.cmd_id, pipeline_id=self.pipeline_id, epoch=epoch
                )
            )

    def _error(self, command: ev.Command, reason: str) -> None:
        self.send(
            ev.ErrorReply(
                sender=self.worker_id,
                reply_to=command.cmd_id,
                code="command_failed",
                message=f"pipeline {self.pipeline_id} on {self.worker_id}, epoch {command.epoch}: {reason}",
            )
        )
