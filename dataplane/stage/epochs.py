"""A worker's stages across epochs: the one serving now, the one prepared for the next epoch,
and the weights and KV that move between workers while the pipeline is re-shaped."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import zmq

from common import events as ev
from common.errors import FlexPipeError, PipelineError
from common.model.spec import ModelSpec
from dataplane.models import adapter_for
from dataplane.models.checkpoint import CheckpointReader
from dataplane.stage.executor import StageExecutor, StageSpec, resolve_dtype
from dataplane.stage.param_cache import ParamCache
from dataplane.stage.server import StageServer
from dataplane.stage.unit_state import fill, skeleton, unit_tensors
from dataplane.transport import Inbox, Outbox, messages, open_outbox

log = logging.getLogger("flexpipe.stage")

PEER_SEND_TIMEOUT_S = 30.0  # a receiver installing a large stage on a busy host drains slowly; PREPARE has 120 s


class EpochListener(Protocol):
    """Who hears what a ``StageEpochs`` finished on its own time (answers to deferred commands)."""

    def prepared(
        self,
        epoch: int,
        stage: int,
        sources: dict[str, str],
        bytes_by_source: dict[str, int],
        kv_bytes_allocated: int,
        seconds: float,
    ) -> None: ...

    def activated(self, epoch: int) -> None: ...

    def kv_received(self, epoch: int, transfer_id: int, num_slots: int, nbytes: int) -> None: ...

    def failed(self, epoch: int, reason: str) -> None: ...


@dataclass
class PendingStage:
    """A stage being prepared for ``command.epoch`` on ``device``: units gathered so far, peers still awaited."""

    command: ev.PrepareStageEpoch
    device: str
    provided: dict[str, object]
    sources: dict[str, str]
    awaiting: set[str]
    started: float
    server: StageServer | None = None
    received_slots: dict[int, int] = field(default_factory=dict)
    activate_when: dict[int, int] | None = None
    activate_after_seal: int = -1
    checkpoint: tuple | None = None  # (reader, adapter), opened once for every unit a peer sends


@dataclass
class KvCopyJob:
    """KV slots of one layer on their way to the layer's next owner, sent a chunk at a time."""

    epoch: int
    transfer_id: int
    layer: int
    pool: torch.Tensor
    outbox: Outbox
    slots: torch.Tensor
    chunk_slots: int
    bytes_per_s: float
    after_seal: int = -1
    position: int = 0
    next_send_at: float = 0.0


@dataclass
class StageEpochs:
    """What one worker serves, epoch by epoch.

    Invariants: micro-batches go only to the active server, which refuses other epochs;
    KV and weights for epoch e land only in the stage prepared for e and are refused
    otherwise; ``abort(e)`` drops everything of epoch e and leaves the active server
    and the parameter cache as they were; ``commit(e)`` retires the previous server and
    keeps the units it no longer serves in the host parameter cache; precopy sends
    happen between micro-batches, a chunk at a time, at most at the asked rate; a KV send
    or an activation that waits for a seal starts only after the active server forwarded it,
    that is after every micro-batch launched before the seal.
    """

    context: zmq.Context
    inbox: Inbox
    session_dir: str
    transport: str
    worker_id: str
    listener: EpochListener
    cache: ParamCache
    slot_bytes: int = 4 << 20
    active: StageServer | None = None
    retiring: StageServer | None = None
    pending: PendingStage | None = None
    jobs: deque = field(default_factory=deque)
    early_weights: dict = field(default_factory=dict)
    peer_outboxes: dict = field(default_factory=dict)
    sealed_through: int = -1

    # ---- serving -------------------------------------------------------------------------

    def on_data(self, message) -> None:
        """Dispatch one data-plane message by its header."""
        try:
            header = messages.decode(message.header)
        except Exception as exc:  # a malformed header is answered or dropped; the worker keeps serving
            batch_id = messages.micro_batch_id(message.header)
            if batch_id is not None and self.active is not None:
                self.active.fail(batch_id, f"unreadable micro-batch: {exc}")
            else:
                log.error("dropping an unreadable data message: %s", exc)
            message.release()
            return
        if isinstance(header, messages.MicroBatch) and self.active is not None:
            self.active.serve(message, header)
            return
        try:
            if isinstance(header, messages.EpochSeal):
                self._pass_seal(header, message)
            elif isinstance(header, messages.KvBlocks):
                self._receive_kv(header, message)
            elif isinstance(header, messages.UnitWeights):
                self._receive_weights(header, message)
            else:
                log.error("dropping a %s this worker cannot serve now", type(header).__name__)
        finally:
            message.release()

    def _pass_seal(self, seal: messages.EpochSeal, message) -> None:
        if self.active is None or self.active.epoch != seal.epoch:
            log.warning("dropping the seal of epoch %s: this worker does not serve it", seal.epoch)
            return
        if self.active.next_out is not None:
            self.active.next_out.send(message.header)
        self.sealed_through = max(self.sealed_through, seal.launched)
        self._activate_if_ready()

    # ---- PREPARE -------------------------------------------------------------------------

    def prepare(self, command: ev.PrepareStageEpoch, device: str) -> None:
        if self.pending is not None:
            self._drop_pending()
        provided, sources = {}, dict(command.sources)
        resident = self.active.executor.unit_by_name if self.active is not None else {}
        for unit, source in command.sources.items():
            if source == "resident":
                if unit not in resident:
                    raise PipelineError(f"worker {self.worker_id} was told it serves {unit}, but it does not")
                provided[unit] = resident[unit]
            elif source == "cache":
                cached = self.cache.get(unit)
                if cached is None:
                    sources[unit] = "disk"
                else:
                    provided[unit] = cached
        awaiting = {u for u, s in sources.items() if s == "peer"}
        self.slot_bytes = command.slot_bytes
        self.pending = PendingStage(command, device, provided, sources, awaiting, time.perf_counter())
        for unit in list(awaiting):
            tensors = self.early_weights.pop((command.epoch, unit), None)
            if tensors is not None:
                self._adopt_peer_unit(unit, tensors)
        self._finish_prepare_if_ready()

    def _receive_weights(self, header: messages.UnitWeights, message) -> None:
        tensors = {name: t.clone() for name, t in zip(header.names, message.tensors)}
        pending = self.pending
        if pending is not None and pending.command.epoch == header.epoch and header.unit in pending.awaiting:
            self._adopt_peer_unit(header.unit, tensors)
            self._finish_prepare_if_ready()
        elif pending is None or header.epoch > pending.command.epoch:
            self.early_weights[(header.epoch, header.unit)] = tensors
        else:
            log.warning("dropping weights of %s for epoch %s", header.unit, header.epoch)

    def _adopt_peer_unit(self, unit: str, tensors: dict) -> None:
        command = self.pending.command
        if self.pending.checkpoint is None:
            reader = CheckpointReader(Path(command.model_dir))
            adapter = adapter_for(ModelSpec.from_dir(command.model_dir), set(reader.weight_map))
            self.pending.checkpoint = (reader, adapter)
        reader, adapter = self.pending.checkpoint
        shapes = {name: reader.shape(name) for name in adapter.tensor_names(unit)}
        built = skeleton(adapter, unit, shapes, resolve_dtype(command.dtype))
        self.pending.provided[unit] = fill(built, {k: v.to(self.pending.device) for k, v in tensors.items()})
        self.pending.awaiting.discard(unit)

    def _finish_prepare_if_ready(self) -> None:
        pending = self.pending
        if pending is None or pending.awaiting or pending.server is not None:
            return
        command = pending.command
        spec = StageSpec(
            command.model_dir,
            tuple(command.units),
            command.num_kv_blocks,
            command.block_size,
            command.dtype,
            pending.device,
        )
        executor = StageExecutor(spec, pending.provided, pending.sources)
        executor.warm_up()
        server = StageServer(
            self.context,
            spec,
            stage=command.stage,
            num_stages=command.num_stages,
            epoch=command.epoch,
            transport=self.transport,
            session_dir=self.session_dir,
            name=f"stage-{self.worker_id}",
            inbox=self.inbox,
            executor=executor,
        )
        server.connect(command.next_address, command.engine_address, command.slot_bytes)
        pending.server = server
        self.listener.prepared(
            command.epoch,
            command.stage,
            executor.sources,
            executor.bytes_by_source(),
            executor.fresh_kv_bytes,
            time.perf_counter() - pending.started,
        )

    def send_units(self, command: ev.SendStageUnits) -> None:
        if self.active is None:
            raise PipelineError(f"worker {self.worker_id} serves nothing to send")
        outbox = self._peer_outbox(command.dest_address)
        for unit in command.units:
            if unit not in self.active.executor.unit_by_name:
                raise PipelineError(f"worker {self.worker_id} does not serve {unit}")
            tensors = unit_tensors(self.active.executor.unit_by_name[unit])
            header = messages.encode(messages.UnitWeights(command.epoch, unit, list(tensors)))
            outbox.send(header, list(tensors.values()))

    def _peer_outbox(self, address: str) -> Outbox:
        if address not in self.peer_outboxes:
            self.peer_outboxes[address] = open_outbox(
                self.transport, self.context, address, slot_bytes=self.slot_bytes, num_slots=8
            )
            self.peer_outboxes[address].timeout_s = PEER_SEND_TIMEOUT_S
        return self.peer_outboxes[address]

    # ---- PRECOPY and the SWITCH delta ----------------------------------------------------------

    def precopy(self, command: ev.CopyStageKv) -> None:
        if self.active is None or command.layer not in self.active.executor.kv_pools:
            raise PipelineError(f"worker {self.worker_id} holds no KV of layer {command.layer}")
        pool = self.active.executor.kv_pools[command.layer]
        slots = torch.from_numpy(np.frombuffer(command.slots, dtype="<i8").copy())
        slot_bytes = pool[:, 0].numel() * pool.element_size()
        chunk = max(1, (self.slot_bytes // 2) // slot_bytes)
        self.jobs.append(
            KvCopyJob(
                command.epoch,
                command.transfer_id,
                command.layer,
                pool,
                self._peer_outbox(command.dest_address),
                slots,
                chunk,
                command.bytes_per_s,
                command.after_seal,
            )
        )

    def pump(self) -> float | None:
        """Send the next due KV chunk; seconds until one is due again (None: nothing queued)."""
        while self.jobs:
            job = self.jobs[0]
            if job.after_seal > self.sealed_through:
                return None
            now = time.monotonic()
            if now < job.next_send_at:
                return job.next_send_at - now
            part = job.slots[job.position : job.position + job.chunk_slots]
            data = job.pool.index_select(1, part.to(job.pool.device))
            header = messages.encode(messages.KvBlocks(job.epoch, job.transfer_id, job.layer))
            try:
                job.outbox.send(header, [part, data])
            except FlexPipeError as exc:
                self.jobs.popleft()
                self.listener.failed(job.epoch, f"KV transfer {job.transfer_id} failed: {exc}")
                continue
            job.position += len(part)
            if job.bytes_per_s > 0:
                job.next_send_at = now + data.numel() * data.element_size() / job.bytes_per_s
            if job.position >= len(job.slots):
                self.jobs.popleft()
            return 0.0
        return None

    def _receive_kv(self, header: messages.KvBlocks, message) -> None:
        pending = self.pending
        if pending is None or pending.server is None or pending.command.epoch != header.epoch:
            log.warning("refusing KV of epoch %s: no stage is prepared for it", header.epoch)
            return
        slots, data = message.tensors
        pool = pending.server.executor.kv_pools.get(header.layer)
        if pool is None:
            log.error("refusing KV of layer %s: the prepared stage does not own it", header.layer)
            return
        pool.index_copy_(1, slots.to(pool.device), data.to(pool.device))
        pending.received_slots[header.transfer_id] = pending.received_slots.get(header.transfer_id, 0) + len(slots)
        self.listener.kv_received(header.epoch, header.transfer_id, len(slots), data.numel() * data.element_size())
        self._activate_if_ready()

    # ---- SWITCH, COMMIT, ABORT ---------------------------------------------------------------

    def activate(self, epoch: int, expect_slots: dict[int, int], after_seal: int = -1) -> None:
        """Switch to the prepared stage of ``epoch`` once the KV transfers in ``expect_slots`` (id → slot
        count) have landed and, on a worker serving now, the seal ``after_seal`` (when >= 0) has passed."""
        pending = self.pending
        if pending is None or pending.server is None or pending.command.epoch != epoch:
            raise PipelineError(f"worker {self.worker_id} has no stage prepared for epoch {epoch}")
        pending.activate_when = dict(expect_slots)
        pending.activate_after_seal = after_seal
        self._activate_if_ready()

    def _activate_if_ready(self) -> None:
        pending = self.pending
        if pending is None or pending.activate_when is None:
            return
        if any(pending.received_slots.get(t, 0) < n for t, n in pending.activate_when.items()):
            return
        if self.active is not None and pending.activate_after_seal > self.sealed_through:
            return
        self.retiring, self.active, self.pending = self.active, pending.server, None
        self.listener.activated(pending.command.epoch)

    def commit(self, epoch: int) -> list[str]:
        old = self.retiring
        if old is None and self.active is not None and self.active.epoch < epoch:
            old, self.active = self.active, None
        self.retiring = None
        kept = set(self.active.executor.unit_by_name) if self.active is not None else set()
        cached = []
        if old is not None:
            for name, unit in old.executor.unit_by_name.items():
                if name not in kept and self.cache.put(name, unit):
                    cached.append(name)
            old.close(keep_inbox=True)
        self._close_peer_outboxes()
        self.early_weights = {k: v for k, v in self.early_weights.items() if k[0] > epoch}
        return cached

    def abort(self, epoch: int) -> None:
        """Forget epoch ``epoch``; a stage already activated for it hands serving back to its predecessor."""
        if self.pending is not None and self.pending.command.epoch == epoch:
            self._drop_pending()
        if self.active is not None and self.active.epoch == epoch:
            self.active.close(keep_inbox=True)
            self.active, self.retiring = self.retiring, None
        self.jobs = deque(job for job in self.jobs if job.epoch != epoch)
        self.early_weights = {k: v for k, v in self.early_weights.items() if k[0] != epoch}
        self._close_peer_outboxes()

    def _drop_pending(self) -> None:
        if self.pending.server is not None:
            self.pending.server.close(keep_inbox=True)
        self.pending = None

    def _close_peer_outboxes(self) -> None:
        if self.jobs:
            return
        for outbox in self.peer_outboxes.values():
            outbox.close()
        self.peer_outboxes.clear()

    def close(self) -> None:
        self.jobs.clear()
        self._close_peer_outboxes()
        for server in (self.pending.server if self.pending else None, self.retiring, self.active):
            if server is not None:
                server.close(keep_inbox=True)
        self.inbox.close()
