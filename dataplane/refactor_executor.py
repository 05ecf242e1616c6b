"""Carries out refactor phases on a pipeline's stage worker processes, for the refactor coordinator."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from common import events as ev
from common.errors import FlexPipeError, PipelineError, RefactorRefused
from dataplane import worker_protocol as proto
from dataplane.kv_cache import PRECOPY_ROUNDS, PRECOPY_SMALL_SLOTS, Watermark, slots_since
from dataplane.refactor_plan import SPAWN, RefactorPlan, WorkerHoldings, plan_refactor
from dataplane.refactor_report import RefactorReport
from dataplane.transport import open_outbox

REFILL_WAIT_S = 0.25  # COMMIT waits at most this long for the new pipeline's first answers


class PhaseFailed(FlexPipeError):
    pass


@dataclass
class RefactorWork:
    """Everything one refactor has set up so far, so that ABORT can undo exactly that."""

    plan: RefactorPlan
    report: RefactorReport
    bytes_per_s: float
    spawned: list[int] = field(default_factory=list)
    new_outbox: object = None
    old_outbox: object = None
    watermarks: dict[int, Watermark] = field(default_factory=dict)
    paused: bool = False
    switched: bool = False
    next_transfer: int = 1


class RefactorExecutor:
    """Runs PREPARE, PRECOPY, SWITCH, COMMIT and ABORT of the offline pipeline ``pipeline``.

    Invariants: until SWITCH adopts the new layout the engine serves the old one and the
    old workers' stages are untouched (I3); KV of a request moves in pre-copy rounds
    while serving goes on, and inside the stall only the slots computed since the last
    round move (I4); a phase that cannot finish by its deadline, or whose worker dies,
    fails with the reason, and ABORT then restores the old epoch wherever it got to.
    """

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self.works: dict[int, RefactorWork] = {}

    @property
    def processes(self):
        return self.pipeline.processes

    @property
    def engine(self):
        return self.pipeline.engine

    # ---- PLAN --------------------------------------------------------------------------

    def plan(self, request: ev.RefactorPipeline, refactor_id: int, bytes_per_s: float = 0.0) -> RefactorPlan:
        p = self.pipeline
        if p.transport in ("nccl", "gloo"):
            raise RefactorRefused(f"pipelines on the {p.transport} transport cannot be refactored in flight: "
                                  "their process group is fixed at start-up; use shm, tcp or cuda_ipc")
        try:
            new = p.target_layout(request.num_stages, request.layout)
        except (FlexPipeError, ValueError) as exc:
            raise RefactorRefused(str(exc)) from exc
        plan = plan_refactor(p.unit_names, p.model_sizes(), p.layout, p.stage_workers, self._holdings(), new,
                             request.migrate, p.worker_memory, p.max_workers, p.kv_tokens_in_use(),
                             p.step_estimate_s())
        report = RefactorReport(refactor_id=refactor_id, kind=plan.kind, from_epoch=p.epoch,
                                old_layout=plan.old_layout.describe(p.unit_names),
                                new_layout=plan.new_layout.describe(p.unit_names),
                                kv_layers_moved=sorted(m.layer for m in plan.kv_moves))
        self.works[refactor_id] = RefactorWork(plan, report, bytes_per_s)
        return plan

    def _holdings(self) -> dict[int, WorkerHoldings]:
        p = self.pipeline
        serving = {w: tuple(p.layout.stage_units(s, p.unit_names)) for s, w in enumerate(p.stage_workers)}
        return {w: WorkerHoldings(w, serving.get(w, ()), tuple(p.cached_units.get(w, ())))
                for w in self.processes.processes}

    # ---- phases ------------------------------------------------------------------------

    def run(self, phase: ev.RefactorPhase, deadline: float) -> ev.RefactorPhaseDone:
        work = self.works[phase.refactor_id]
        started = time.monotonic()
        runner: Callable = {"PREPARE": self._prepare, "PRECOPY": self._precopy, "SWITCH": self._switch,
                            "COMMIT": self._commit, "ABORT": self._abort}[phase.phase]
        before = (work.report.weight_bytes, work.report.kv_bytes)
        ok, reason = True, ""
        try:
            runner(work, phase.epoch, deadline)
        except (FlexPipeError, OSError) as exc:
            ok, reason = False, str(exc)
        duration = time.monotonic() - started
        work.report.phase_seconds[phase.phase] = duration
        if phase.phase in ("COMMIT", "ABORT"):
            self.works.pop(phase.refactor_id, None)
        return ev.RefactorPhaseDone(pipeline_id=phase.pipeline_id, refactor_id=phase.refactor_id, epoch=phase.epoch,
                                    phase=phase.phase, ok=ok, reason=reason, duration_s=duration,
                                    weight_bytes=work.report.weight_bytes - before[0],
                                    kv_bytes=work.report.kv_bytes - before[1], stall_s=work.report.stall_s)

    def report(self, refactor_id: int) -> RefactorReport | None:
        work = self.works.get(refactor_id)
        return work.report if work else None

    def _prepare(self, work: RefactorWork, epoch: int, deadline: float) -> None:
        p, plan = self.pipeline, work.plan
        missing = plan.workers.count(SPAWN)
        if missing:
            work.spawned = self.processes.spawn(missing)
            fresh = iter(work.spawned)
            plan.workers = [next(fresh) if w == SPAWN else w for w in plan.workers]
        work.report.workers = list(plan.workers)
        inboxes = self.processes.inboxes
        stages = plan.new_layout.num_stages
        for j, worker in enumerate(plan.workers):
            self.processes.send(worker, proto.PrepareStage(
                epoch, j, stages, str(p.model_dir), plan.new_layout.stage_units(j, p.unit_names), plan.sources[j],
                p.num_kv_blocks, p.block_size, p.dtype, p.device_of(worker),
                inboxes[plan.workers[j + 1]] if j + 1 < stages else "", p.engine_address, p.slot_bytes))
        wanted: dict[tuple[int, int], list[str]] = {}
        for j, chosen in enumerate(plan.sources):
            for unit, source in chosen.items():
                if source == "peer":
                    wanted.setdefault((plan.peers[unit], plan.workers[j]), []).append(unit)
        for (peer, dest), units in wanted.items():
            self.processes.send(peer, proto.SendUnits(epoch, units, inboxes[dest]))
        work.new_outbox = open_outbox("tcp", p.context, inboxes[plan.workers[0]])
        prepared: dict[int, proto.StagePrepared] = {}
        watch = set(plan.workers) | {peer for peer, _ in wanted}

        def take(worker, message):
            if isinstance(message, proto.StagePrepared) and message.epoch == epoch:
                prepared[worker] = message
        self._await(take, lambda: len(prepared) == stages, deadline, watch, epoch, "PREPARE")
        for reply in prepared.values():
            work.report.unit_sources.update(reply.sources)
            for source, nbytes in reply.bytes_by_source.items():
                if source != "resident":
                    work.report.weight_bytes_by_source[source] = work.report.weight_bytes_by_source.get(source, 0) + nbytes
                    work.report.weight_bytes += nbytes

    def _precopy(self, work: RefactorWork, epoch: int, deadline: float) -> None:
        if not work.plan.kv_moves:
            return
        for round_index in range(PRECOPY_ROUNDS):
            snapshot = self.engine.call(self.engine.scheduler.kv_in_use, timeout_s=max(0.1, deadline - time.monotonic()))
            slots, marks = slots_since(work.watermarks, snapshot, self.pipeline.block_size)
            if round_index > 0 and len(slots) <= PRECOPY_SMALL_SLOTS:
                break
            nbytes = self._copy_kv(work, epoch, slots, work.bytes_per_s if round_index == 0 else 0.0, deadline)
            work.watermarks = marks
            work.report.kv_bytes_precopy += nbytes
            work.report.kv_bytes += nbytes
            work.report.precopy_rounds += 1

    def _switch(self, work: RefactorWork, epoch: int, deadline: float) -> None:
        p, plan = self.pipeline, work.plan
        engine, scheduler = self.engine, self.engine.scheduler
        paused_at = time.monotonic()
        # The delta and the activations are posted as launching stops: each source sends its
        # delta as soon as the seal behind the last old-epoch micro-batch has passed it, so
        # the copy overlaps the drain instead of following it.
        launched, snapshot = engine.begin_pause(max(0.05, deadline - time.monotonic()), seal=True,
                                                on_paused=lambda: scheduler.kv_in_use(in_flight=True),
                                                on_parked=lambda: len(scheduler.kv_in_use()))
        work.paused = True
        slots, _ = slots_since(work.watermarks, snapshot, p.block_size)
        expect = self._start_kv_copy(work, epoch, slots, 0.0, after_seal=launched)
        for j, worker in enumerate(plan.workers):
            mine = {t: n for t, (stage, n) in expect.items() if stage == j}
            self.processes.send(worker, proto.ActivateEpoch(epoch, mine, after_seal=launched))
        parked_at = engine.wait_parked(max(0.05, deadline - time.monotonic()))
        activated: set[int] = set()
        nbytes = [0]

        def take(worker, message):
            if isinstance(message, proto.EpochActivated) and message.epoch == epoch:
                activated.add(worker)
            elif isinstance(message, proto.KvReceived) and message.epoch == epoch and message.transfer_id in expect:
                nbytes[0] += message.nbytes
        watch = set(plan.workers) | {m.source for m in plan.kv_moves}
        self._await(take, lambda: len(activated) == len(plan.workers), deadline, watch, epoch, "SWITCH")
        nbytes, carried = nbytes[0], engine.parked_result
        work.old_outbox = self.engine.resume(work.new_outbox, epoch, plan.new_layout.num_stages)
        resumed_at = time.monotonic()
        work.new_outbox, work.paused, work.switched = None, False, True
        p.adopt(plan.new_layout, plan.workers, epoch)
        work.report.requests_carried = carried
        work.report.kv_bytes_delta = nbytes
        work.report.kv_bytes += nbytes
        work.report.stall_s = resumed_at - parked_at
        work.report.switch_s = resumed_at - paused_at
        work.report.switch_window = (time.perf_counter() - (resumed_at - paused_at), time.perf_counter())
        work.report.epoch = epoch

    def _commit(self, work: RefactorWork, epoch: int, deadline: float) -> None:
        # Retiring old stages (closing rings, caching units) runs on the workers' serving threads:
        # let the new pipeline answer its first micro-batches before that work competes with them.
        settle_by = min(deadline, time.monotonic() + REFILL_WAIT_S)
        while not self.engine.refilled and time.monotonic() < settle_by:
            time.sleep(0.001)
        involved = self._live(set(work.plan.old_workers) | set(work.plan.workers))
        for worker in involved:
            self.processes.send(worker, proto.CommitEpoch(epoch))
        settled: dict[int, list[str]] = {}

        def take(worker, message):
            if isinstance(message, proto.EpochSettled) and message.epoch == epoch:
                settled[worker] = message.cached_units
        try:
            self._await(take, lambda: involved <= set(settled), deadline, involved, epoch, "COMMIT")
        finally:
            if work.old_outbox is not None:
                work.old_outbox.close()
            for worker, cached in settled.items():
                self.pipeline.note_cached(worker, cached)

    def _abort(self, work: RefactorWork, epoch: int, deadline: float) -> None:
        p = self.pipeline
        if work.paused:
            self.engine.resume()
            work.paused = False
        involved = self._live(set(work.plan.old_workers) | set(work.plan.workers) - {SPAWN} | set(work.spawned))
        for worker in involved:
            self.processes.send(worker, proto.AbortEpoch(epoch))
        settled: set[int] = set()

        def take(worker, message):
            if isinstance(message, proto.EpochSettled) and message.epoch == epoch:
                settled.add(worker)
        try:
            self._await(take, lambda: self._live(involved) <= settled, deadline, set(), epoch, "ABORT")
        finally:
            if work.new_outbox is not None:
                work.new_outbox.close()
                work.new_outbox = None
            self.processes.forget_dead()
            work.report.epoch = p.epoch

    # ---- helpers -----------------------------------------------------------------------

    def _live(self, workers: set[int]) -> set[int]:
        dead = {i for i, _, _ in self.processes.dead_workers()}
        return {w for w in workers if w in self.processes.processes and w not in dead}

    def _start_kv_copy(self, work: RefactorWork, epoch: int, slots: np.ndarray,
                       bytes_per_s: float, after_seal: int = -1) -> dict[int, tuple[int, int]]:
        """Ask each moving layer's owner to send ``slots`` to the new owner (once the seal ``after_seal``
        has passed it, if given); transfer id → (new stage, slot count)."""
        if len(slots) == 0:
            return {}
        plan, inboxes = work.plan, self.processes.inboxes
        payload = slots.astype("<i8").tobytes()
        started = {}
        for move in plan.kv_moves:
            transfer = work.next_transfer
            work.next_transfer += 1
            started[transfer] = (move.dest_stage, len(slots))
            self.processes.send(move.source, proto.PrecopyKv(epoch, transfer, move.layer,
                                                             inboxes[plan.workers[move.dest_stage]], payload, bytes_per_s,
                                                             after_seal))
        return started

    def _copy_kv(self, work: RefactorWork, epoch: int, slots: np.ndarray, bytes_per_s: float, deadline: float) -> int:
        """Every moving layer's ``slots`` to its new owner and wait until they landed; returns the bytes."""
        expected = {t: n for t, (_, n) in self._start_kv_copy(work, epoch, slots, bytes_per_s).items()}
        received = {t: 0 for t in expected}
        nbytes = [0]

        def take(worker, message):
            if isinstance(message, proto.KvReceived) and message.epoch == epoch and message.transfer_id in received:
                received[message.transfer_id] += message.num_slots
                nbytes[0] += message.nbytes
        watch = {m.source for m in work.plan.kv_moves} | set(work.plan.workers)
        self._await(take, lambda: received == expected, deadline, watch, epoch, "KV copy")
        return nbytes[0]

    def _await(self, take: Callable, done: Callable[[], bool], deadline: float, watch: set[int], epoch: int,
               what: str) -> None:
        while not done():
            dead = self.processes.dead_workers(watch)
            if dead:
                worker, pid, code = dead[0]
                raise PhaseFailed(f"worker {worker} (pid {pid}) exited with code {code} during {what}")
            if self.engine.fatal_error is not None:
                raise PhaseFailed(f"the engine stopped during {what}: {self.engine.fatal_error}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PhaseFailed(f"{what} did not finish by its deadline")
            try:
                received = self.processes.receive(min(0.05, remaining))
            except PipelineError as exc:
                raise PhaseFailed(str(exc)) from exc
            if received is None:
                continue
            worker, message = received
            if isinstance(message, proto.WorkerError) and message.epoch in (epoch, -1) and worker in watch:
                raise PhaseFailed(f"worker {worker}: {message.message}")
            take(worker, message)
