"""The refactor executor of a cluster: carries out the refactor coordinator's phases with commands
to workers and the engine host, as a pure state machine.

PREPARE first has a supervisor start the workers the plan needs and waits until they
registered, opens the new owners' inboxes, then has every worker of the target layout build
its stage (weights from itself, its cache, a peer or disk). PRECOPY copies the KV of
moving layers for what the running requests hold at a snapshot, in up to three rounds,
each copying what was written since the last. SWITCH stops the engine launching (a seal
follows its last micro-batch), has each source send the delta past the last snapshot
once the seal has passed it, activates the new stages once their KV landed and the seal
passed, and resumes the engine on the new first stage. COMMIT lets the new layout answer its
first micro-batches (bounded), then every worker drops what it no longer serves into its host
parameter cache, which later plans take weights from; ABORT resumes the engine unchanged and
drops the new epoch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import ClassVar

from common import events as ev
from controlplane.actor import Action, Send, Tell, Tick
from controlplane.refactor.plan import SPAWN
from controlplane.refactor.planner import ClusterPlan, RefactorPlanner
from controlplane.refactor.precopy import PRECOPY_ROUNDS, PRECOPY_SMALL_SLOTS, Watermark, slots_since

REFACTOR = "refactor"
REFILL_WAIT_S = 0.25  # COMMIT waits at most this long for the new layout's first answers


@dataclass
class ClusterRun:
    """One refactor: its plan, the step it waits in, and the answers gathered so far."""

    refactor_id: int
    pipeline_id: str
    cluster_plan: ClusterPlan
    bytes_per_s: float = 0.0
    epoch: int = 0
    phase: str = ""
    step: str = ""
    pending: dict[int, str] = field(default_factory=dict)
    spawning: set[str] = field(default_factory=set)
    inboxes: dict[str, str] = field(default_factory=dict)
    expected: dict[int, int] = field(default_factory=dict)
    landed: dict[int, int] = field(default_factory=dict)
    marks: dict[int, Watermark] = field(default_factory=dict)
    weight_bytes_by_source: dict[str, int] = field(default_factory=dict)
    unit_sources: dict[str, str] = field(default_factory=dict)
    kv_bytes: int = 0
    paused: bool = False
    snapshot: list = field(default_factory=list)
    launched: int = -1
    precopy_rounds: int = 0
    transfer_stage: dict[int, tuple[int, int]] = field(default_factory=dict)
    started: float = 0.0
    switch: ev.SwitchTiming | None = None
    next_transfer: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def plan(self):
        return self.cluster_plan.plan

    def new_workers(self) -> list[str]:
        """The target's workers, one per new stage (those still to be started left out)."""
        return [self.cluster_plan.worker(w) for w in self.plan.workers if w != SPAWN]

    def old_workers(self) -> list[str]:
        return [self.cluster_plan.worker(w) for w in self.plan.old_workers]

    def involves(self, worker_id: str) -> bool:
        return (
            worker_id in self.pending.values()
            or worker_id in self.spawning
            or worker_id in self.old_workers()
            or worker_id in self.new_workers()
        )


class RefactorExecutor:
    """Runs refactor phases of cluster pipelines.

    Invariants: a phase is done when every command it sent is answered; an ErrorReply, a
    ``StageEpochFailed`` or the loss of an involved worker fails the phase (the refactor
    coordinator then asks for ABORT, which answers even when peers are gone); the engine is
    resumed by SWITCH or by ABORT whenever it was paused; the deploy coordinator and the
    allocator learn the new layout (``PipelineReshaped``) exactly when the engine resumed on it;
    ``cached_units`` follows what COMMIT reports each worker keeps in its host cache, and is
    forgotten for a worker that registers again (a new process has an empty cache).
    """

    name: ClassVar[str] = "refactor_executor"
    accepts: ClassVar[tuple[type, ...]] = (
        ev.RefactorPhase,
        ev.StageInboxOpened,
        ev.StageEpochPrepared,
        ev.Ack,
        ev.ErrorReply,
        ev.StageKvCopied,
        ev.StageEpochActivated,
        ev.StageEpochSettled,
        ev.StageEpochFailed,
        ev.EnginePaused,
        ev.KvSnapshot,
        ev.EngineResumed,
        ev.WorkersSpawned,
        ev.RegisterWorker,
        ev.WorkerLost,
        Tick,
    )

    def __init__(self, planner: RefactorPlanner) -> None:
        self.planner = planner
        self.runs: dict[int, ClusterRun] = {}
        self.cached_units: dict[str, set[str]] = {}
        self._cmd_ids = itertools.count(1_000_000_000)
        self._owner: dict[int, int] = {}
        self.handlers = {
            ev.RefactorPhase: self._start_phase,
            ev.WorkerLost: self._on_worker_lost,
            ev.RegisterWorker: self._on_register_worker,
            ev.StageEpochFailed: self._on_stage_epoch_failed,
            ev.StageKvCopied: self._on_kv_copied,
            Tick: lambda event, now: [],
        }

    # ---- PLAN (called by the refactor coordinator) ---------------------------------------

    def plan(self, request: ev.RefactorPipeline, refactor_id: int):
        cluster_plan = self.planner(request, self.cached_units)
        if not request.dry_run:
            self.runs[refactor_id] = ClusterRun(
                refactor_id, request.pipeline_id, cluster_plan, bytes_per_s=max(0.0, request.precopy_bytes_per_s)
            )
        return cluster_plan.summary

    # ---- events --------------------------------------------------------------------------

    def handle(self, event, now: float) -> list[Action]:
        handler = self.handlers.get(type(event))
        if handler is not None:
            return handler(event, now)
        return self._reply(event, now) if isinstance(event, ev.Reply) else []

    def _on_worker_lost(self, event: ev.WorkerLost, now: float) -> list[Action]:
        self.cached_units.pop(event.worker_id, None)
        reason = f"worker {event.worker_id} was lost" + (f": {event.reason}" if event.reason else "")
        actions: list[Action] = []
        for run in [r for r in self.runs.values() if r.involves(event.worker_id)]:
            if run.phase == "ABORT":
                actions += self._forget_peer(run, event.worker_id, now)
            else:
                actions += self._fail(run, reason, now)
        return actions

    def _forget_peer(self, run: ClusterRun, worker_id: str, now: float) -> list[Action]:
        """ABORT waits for no worker that is gone: its commands count as answered."""
        for cmd_id in [cmd_id for cmd_id, peer in run.pending.items() if peer == worker_id]:
            run.pending.pop(cmd_id)
            self._owner.pop(cmd_id, None)
        return self._advance_if_done(run, now)

    def _on_register_worker(self, event: ev.RegisterWorker, now: float) -> list[Action]:
        self.cached_units.pop(event.worker_id, None)
        actions: list[Action] = []
        for run in list(self.runs.values()):
            if event.worker_id in run.spawning:
                run.spawning.discard(event.worker_id)
                actions += self._advance_if_done(run, now)
        return actions

    def _on_stage_epoch_failed(self, event: ev.StageEpochFailed, now: float) -> list[Action]:
        run = self._run_of(event.pipeline_id, event.epoch)
        return self._fail(run, f"{event.worker_id}: {event.reason}", now) if run else []

    def _on_kv_copied(self, event: ev.StageKvCopied, now: float) -> list[Action]:
        run = self._run_of(event.pipeline_id, event.epoch)
        if run is None:
            return []
        run.landed[event.transfer_id] = run.landed.get(event.transfer_id, 0) + event.num_slots
        run.kv_bytes += event.nbytes
        return self._advance_if_done(run, now)

    def _run_of(self, pipeline_id: str, epoch: int) -> ClusterRun | None:
        return next((r for r in self.runs.values() if r.pipeline_id == pipeline_id and r.epoch == epoch), None)

    def _reply(self, reply: ev.Reply, now: float) -> list[Action]:
        run = self.runs.get(self._owner.pop(reply.reply_to, -1))
        if run is None or reply.reply_to not in run.pending:
            return []
        peer = run.pending.pop(reply.reply_to)
        if isinstance(reply, ev.ErrorReply):
            if run.phase == "ABORT":
                return self._advance_if_done(run, now)
            return self._fail(run, f"{peer}: {reply.message}", now)
        if isinstance(reply, ev.StageInboxOpened):
            run.inboxes[peer] = reply.inbox_address
        elif isinstance(reply, ev.WorkersSpawned):
            run.spawning = set(reply.worker_ids) - set(self.planner.cluster.alive_workers())
            run.cluster_plan.adopt_spawned(list(reply.worker_ids))
        elif isinstance(reply, ev.StageEpochPrepared):
            for source, nbytes in reply.bytes_by_source.items():
                if source != "resident":
                    run.weight_bytes_by_source[source] = run.weight_bytes_by_source.get(source, 0) + nbytes
            run.unit_sources.update(reply.sources)
        elif isinstance(reply, (ev.EnginePaused, ev.KvSnapshot)):
            if isinstance(reply, ev.EnginePaused):
                run.paused, run.launched = True, reply.launched
            run.snapshot = list(zip(reply.seq_ids, reply.block_tables, reply.num_computed))
        elif isinstance(reply, ev.EngineResumed):
            run.switch = reply.switch
        elif isinstance(reply, ev.StageEpochSettled) and reply.outcome == "committed" and reply.cached_units:
            self.cached_units.setdefault(peer, set()).update(reply.cached_units)
        return self._advance_if_done(run, now)

    def _advance_if_done(self, run: ClusterRun, now: float) -> list[Action]:
        if run.pending or run.spawning or any(run.landed.get(t, 0) < n for t, n in run.expected.items()):
            return []
        return self.steps[(run.phase, run.step)](run, now)

    # ---- phases --------------------------------------------------------------------------

    @property
    def steps(self) -> dict:
        """What follows once every answer of a phase's step is in: (phase, step) -> next step."""
        return {
            ("PREPARE", "spawn"): self._after_prepare_spawn,
            ("PREPARE", "register"): self._after_prepare_register,
            ("PREPARE", "inboxes"): self._after_prepare_inboxes,
            ("PREPARE", "stages"): self._after_prepare_stages,
            ("PRECOPY", "snapshot"): self._after_precopy_snapshot,
            ("PRECOPY", "copy"): self._after_precopy_copy,
            ("SWITCH", "pause"): self._after_switch_pause,
            ("SWITCH", "activate"): self._after_switch_activate,
            ("SWITCH", "resume"): self._after_switch_resume,
            ("COMMIT", "refill"): self._after_commit_refill,
            ("COMMIT", "settle"): self._after_commit_settle,
            ("ABORT", "settle"): self._after_abort_settle,
        }

    def _start_phase(self, phase: ev.RefactorPhase, now: float) -> list[Action]:
        run = self.runs.get(phase.refactor_id)
        if run is None:
            return [
                self._done_event(
                    phase.pipeline_id, phase.refactor_id, phase.epoch, phase.phase, False, "no plan for this refactor"
                )
            ]
        run.epoch, run.phase, run.started = phase.epoch, phase.phase, now
        for cmd_id in run.pending:
            self._owner.pop(cmd_id, None)
        run.pending.clear()
        run.expected, run.landed = {}, {}
        begin = {
            "PREPARE": self._begin_prepare,
            "PRECOPY": self._begin_precopy,
            "SWITCH": self._begin_switch,
            "COMMIT": self._begin_commit,
            "ABORT": self._begin_abort,
        }[phase.phase]
        return begin(run, now)

    def _begin_prepare(self, run: ClusterRun, now: float) -> list[Action]:
        count = run.cluster_plan.to_spawn
        if not count:
            return self._open_inboxes(run)
        run.step = "spawn"
        return [self._command(run, run.cluster_plan.spawner, ev.SpawnWorkers, count=count)]

    def _after_prepare_spawn(self, run: ClusterRun, now: float) -> list[Action]:
        run.step = "register"
        return self._advance_if_done(run, now)

    def _after_prepare_register(self, run: ClusterRun, now: float) -> list[Action]:
        return self._open_inboxes(run)

    def _open_inboxes(self, run: ClusterRun) -> list[Action]:
        run.step = "inboxes"
        transport = self.planner.coordinator.pipelines[run.pipeline_id].request.transport
        hold = ev.RefactorHold(
            sender=self.name,
            pipeline_id=run.pipeline_id,
            workers=run.new_workers(),
            stage_memory=list(run.plan.stage_memory),
        )
        return [Tell("allocator", hold)] + [
            self._command(
                run, worker, ev.OpenStageInbox, pipeline_id=run.pipeline_id, epoch=run.epoch, transport=transport
            )
            for worker in dict.fromkeys(run.new_workers())
        ]

    def _after_prepare_inboxes(self, run: ClusterRun, now: float) -> list[Action]:
        run.step = "stages"
        pipeline = self.planner.coordinator.pipelines[run.pipeline_id]
        deploy, plan, names = pipeline.request, run.plan, run.cluster_plan.unit_names
        workers = run.new_workers()
        actions = []
        for j, worker in enumerate(workers):
            actions.append(
                self._command(
                    run,
                    worker,
                    ev.PrepareStageEpoch,
                    pipeline_id=run.pipeline_id,
                    epoch=run.epoch,
                    stage=j,
                    num_stages=len(workers),
                    model_dir=deploy.model_dir,
                    units=plan.new_layout.stage_units(j, names),
                    sources=plan.sources[j],
                    num_kv_blocks=pipeline.plan.num_kv_blocks,
                    block_size=deploy.block_size,
                    dtype=deploy.dtype,
                    next_address=run.inboxes[workers[j + 1]] if j + 1 < len(workers) else "",
                    engine_address=pipeline.engine_inbox,
                    slot_bytes=pipeline.plan.slot_bytes,
                )
            )
        wanted: dict[tuple[str, str], list[str]] = {}
        for j, chosen in enumerate(plan.sources):
            for unit, source in chosen.items():
                if source == "peer":
                    wanted.setdefault((run.cluster_plan.worker(plan.peers[unit]), workers[j]), []).append(unit)
        for (peer, dest), units in wanted.items():
            actions.append(
                self._command(
                    run,
                    peer,
                    ev.SendStageUnits,
                    pipeline_id=run.pipeline_id,
                    epoch=run.epoch,
                    units=units,
                    dest_address=run.inboxes[dest],
                )
            )
        return actions

    def _after_prepare_stages(self, run: ClusterRun, now: float) -> list[Action]:
        return [
            self._done(
                run,
                now,
                weight_bytes=sum(run.weight_bytes_by_source.values()),
                weight_bytes_by_source=dict(run.weight_bytes_by_source),
                unit_sources=dict(run.unit_sources),
                workers=run.new_workers(),
            )
        ]

    def _begin_precopy(self, run: ClusterRun, now: float) -> list[Action]:
        if not run.plan.kv_moves:
            return [self._done(run, now)]
        run.kv_bytes, run.precopy_rounds = 0, 0
        return self._after_precopy_copy(run, now)

    def _after_precopy_snapshot(self, run: ClusterRun, now: float) -> list[Action]:
        """A round copies what the requests wrote since the last one; after the first, a small
        remainder is left to SWITCH."""
        run.step = "copy"
        first = run.precopy_rounds == 0
        actions = self._copy_kv(
            run, run.bytes_per_s if first else 0.0, at_least=1 if first else PRECOPY_SMALL_SLOTS + 1
        )
        if not actions:
            return [self._done(run, now, kv_bytes=run.kv_bytes, precopy_rounds=run.precopy_rounds)]
        run.precopy_rounds += 1
        return actions

    def _after_precopy_copy(self, run: ClusterRun, now: float) -> list[Action]:
        if run.precopy_rounds >= PRECOPY_ROUNDS:
            return [self._done(run, now, kv_bytes=run.kv_bytes, precopy_rounds=run.precopy_rounds)]
        run.step = "snapshot"
        host = self.planner.coordinator.pipelines[run.pipeline_id].engine_host
        return [self._command(run, host, ev.SnapshotKv, pipeline_id=run.pipeline_id)]

    def _begin_switch(self, run: ClusterRun, now: float) -> list[Action]:
        run.step = "pause"
        pipeline = self.planner.coordinator.pipelines[run.pipeline_id]
        return [
            self._command(
                run, pipeline.engine_host, ev.PauseEngine, pipeline_id=run.pipeline_id, timeout_s=10.0, seal=True
            )
        ]

    def _after_switch_pause(self, run: ClusterRun, now: float) -> list[Action]:
        run.step = "activate"
        run.kv_bytes = 0
        actions = self._copy_kv(run, 0.0, after_seal=run.launched) if run.plan.kv_moves else []
        transfers = dict(run.expected)
        run.expected = {}
        by_stage: dict[int, list[ev.KvTransfer]] = {}
        for transfer, (stage, slots) in run.transfer_stage.items():
            if transfer in transfers:
                by_stage.setdefault(stage, []).append(ev.KvTransfer(transfer_id=transfer, num_slots=slots))
        for j, worker in enumerate(run.new_workers()):
            actions.append(
                self._command(
                    run,
                    worker,
                    ev.ActivateStageEpoch,
                    pipeline_id=run.pipeline_id,
                    epoch=run.epoch,
                    expect=by_stage.get(j, []),
                    after_seal=run.launched,
                )
            )
        return actions

    def _after_switch_activate(self, run: ClusterRun, now: float) -> list[Action]:
        run.step = "resume"
        pipeline = self.planner.coordinator.pipelines[run.pipeline_id]
        workers = run.new_workers()
        return [
            self._command(
                run,
                pipeline.engine_host,
                ev.ResumeEngine,
                pipeline_id=run.pipeline_id,
                epoch=run.epoch,
                first_stage_address=run.inboxes[workers[0]],
                num_stages=len(workers),
            )
        ]

    def _after_switch_resume(self, run: ClusterRun, now: float) -> list[Action]:
        run.paused = False
        workers, names = run.new_workers(), run.cluster_plan.unit_names
        reshaped = ev.PipelineReshaped(
            sender=self.name,
            pipeline_id=run.pipeline_id,
            epoch=run.epoch,
            workers=workers,
            stage_units=[run.plan.new_layout.stage_units(j, names) for j in range(len(workers))],
            stage_inboxes=[run.inboxes[w] for w in workers],
            stage_memory=list(run.plan.stage_memory),
        )
        return [
            Tell("coordinator", reshaped),
            Tell("allocator", reshaped),
            self._done(run, now, kv_bytes=run.kv_bytes, switch=run.switch),
        ]

    def _begin_commit(self, run: ClusterRun, now: float) -> list[Action]:
        run.step = "refill"
        host = self.planner.coordinator.pipelines[run.pipeline_id].engine_host
        return [self._command(run, host, ev.AwaitRefill, pipeline_id=run.pipeline_id, timeout_s=REFILL_WAIT_S)]

    def _after_commit_refill(self, run: ClusterRun, now: float) -> list[Action]:
        run.step = "settle"
        return [
            self._command(run, worker, ev.CommitStageEpoch, pipeline_id=run.pipeline_id, epoch=run.epoch)
            for worker in dict.fromkeys(run.old_workers() + run.new_workers())
            if worker not in self.planner.coordinator.lost
        ]

    def _after_commit_settle(self, run: ClusterRun, now: float) -> list[Action]:
        self.runs.pop(run.refactor_id, None)
        return [self._done(run, now)]

    def _begin_abort(self, run: ClusterRun, now: float) -> list[Action]:
        run.step = "settle"
        pipeline = self.planner.coordinator.pipelines.get(run.pipeline_id)
        actions = []
        if run.paused and pipeline is not None:
            actions.append(
                self._command(
                    run, pipeline.engine_host, ev.ResumeEngine, pipeline_id=run.pipeline_id, epoch=pipeline.epoch
                )
            )
        actions += [
            self._command(run, worker, ev.AbortStageEpoch, pipeline_id=run.pipeline_id, epoch=run.epoch)
            for worker in dict.fromkeys(run.old_workers() + run.new_workers())
            if worker not in self.planner.coordinator.lost
        ]
        return actions

    def _after_abort_settle(self, run: ClusterRun, now: float) -> list[Action]:
        self.runs.pop(run.refactor_id, None)
        return [Tell("allocator", ev.RefactorHold(sender=self.name, pipeline_id=run.pipeline_id)), self._done(run, now)]

    # ---- helpers -------------------------------------------------------------------------

    def _copy_kv(self, run: ClusterRun, bytes_per_s: float, after_seal: int = -1, at_least: int = 1) -> list[Action]:
        """Commands copying what was written since the watermarks, if that is ``at_least`` slots."""
        block_size = self.planner.coordinator.pipelines[run.pipeline_id].request.block_size
        slots, marks = slots_since(run.marks, run.snapshot, block_size)
        if len(slots) < at_least:
            return []
        run.marks = marks
        slots = slots.astype("<i8")
        actions = []
        workers = run.new_workers()
        for move in run.plan.kv_moves:
            transfer = next(run.next_transfer)
            run.expected[transfer] = len(slots)
            run.transfer_stage[transfer] = (move.dest_stage, len(slots))
            actions.append(
                self._command(
                    run,
                    run.cluster_plan.worker(move.source),
                    ev.CopyStageKv,
                    pipeline_id=run.pipeline_id,
                    epoch=run.epoch,
                    transfer_id=transfer,
                    layer=move.layer,
                    dest_address=run.inboxes[workers[move.dest_stage]],
                    slots=slots.tobytes(),
                    bytes_per_s=bytes_per_s,
                    after_seal=after_seal,
                )
            )
        return actions

    def _command(self, run: ClusterRun, peer: str, kind: type, **fields) -> Send:
        cmd_id = next(self._cmd_ids)
        run.pending[cmd_id] = peer
        self._owner[cmd_id] = run.refactor_id
        return Send(peer, kind(sender=self.name, cmd_id=cmd_id, **fields))

    def _fail(self, run: ClusterRun | None, reason: str, now: float) -> list[Action]:
        if run is None or run.phase in ("ABORT", ""):
            return []
        for cmd_id in run.pending:
            self._owner.pop(cmd_id, None)
        run.pending.clear()
        run.expected = {}
        phase, run.phase = run.phase, ""
        return [self._done_event(run.pipeline_id, run.refactor_id, run.epoch, phase, False, reason, now - run.started)]

    def _done(self, run: ClusterRun, now: float, **fields) -> Tell:
        return Tell(
            REFACTOR,
            ev.RefactorPhaseDone(
                sender=self.name,
                pipeline_id=run.pipeline_id,
                refactor_id=run.refactor_id,
                epoch=run.epoch,
                phase=run.phase,
                ok=True,
                duration_s=now - run.started,
                **fields,
            ),
        )

    def _done_event(
        self, pipeline_id: str, refactor_id: int, epoch: int, phase: str, ok: bool, reason: str, duration_s: float = 0.0
    ) -> Tell:
        return Tell(
            REFACTOR,
            ev.RefactorPhaseDone(
                sender=self.name,
                pipeline_id=pipeline_id,
                refactor_id=refactor_id,
                epoch=epoch,
                phase=phase,
                ok=ok,
                reason=reason,
                duration_s=duration_s,
            ),
        )
