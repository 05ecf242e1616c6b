"""The refactor coordinator: drives each pipeline through PLAN → PREPARE → PRECOPY → SWITCH → COMMIT.

A pure state machine (no sockets, no clocks of its own): requests and phase results go
in, ``Tell``\\s to the refactor executor, replies to requesters and log lines come out.
The executor does the work of each phase and answers ``RefactorPhaseDone``; the
controller's shell or the offline ``LLM``'s refactor service carries events both ways.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

from common import events as ev
from common.errors import RefactorRefused
from controlplane.actor import Log, Send, Tell, Tick

EXECUTOR = "refactor_executor"
WORK_PHASES = ("PREPARE", "PRECOPY", "SWITCH", "COMMIT")
DEFAULT_PHASE_TIMEOUTS = {"PREPARE": 120.0, "PRECOPY": 120.0, "SWITCH": 30.0, "COMMIT": 30.0, "ABORT": 30.0}


class PlanSummary(Protocol):
    """What PLAN decided, as far as the coordinator needs to know (``ClusterPlanSummary``)."""

    kind: str
    source: list[str]
    target: list[str]
    workers: list[str]
    moves: list[str]
    kv_layers_moved: list[int]
    stage_memory: list[int]
    weight_bytes_by_source: dict[str, int]
    kv_bytes_estimate: int
    stall_estimate_s: float
    from_epoch: int | None  # the epoch serving now; None: the coordinator's own count
    engine_host: str  # told the outcome too (its gateway counts refactors); "" = nobody


@dataclass
class RefactorRun:
    """One refactor in progress. ``epoch`` is the epoch it moves the pipeline to."""

    refactor_id: int
    request: ev.RefactorPipeline
    requester: str
    epoch: int
    kind: str
    target: list[str]
    started: float
    phase: str = "PLAN"
    phase_started: float = 0.0
    deadline: float = 0.0
    summary: PlanSummary | None = None
    failure: str = ""
    phase_seconds: dict[str, float] = field(default_factory=dict)
    weight_bytes: int = 0
    weight_bytes_by_source: dict[str, int] = field(default_factory=dict)
    unit_sources: dict[str, str] = field(default_factory=dict)
    workers: list[str] = field(default_factory=list)
    kv_bytes_precopy: int = 0
    kv_bytes_delta: int = 0
    precopy_rounds: int = 0
    switch: ev.SwitchTiming | None = None

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_precopy + self.kv_bytes_delta


@dataclass
class PipelineRefactors:
    epoch: int = 0
    active: RefactorRun | None = None
    queued: deque = field(default_factory=deque)


class RefactorCoordinator:
    """Runs refactors, one at a time per pipeline.

    Invariants: a pipeline has at most one refactor past PLAN; a request arriving while
    one runs is queued (up to ``max_queued``) or refused with the reason; every phase
    has a deadline and a phase that misses it counts as failed; a failure before SWITCH
    has completed leads to ABORT and the old epoch keeps serving; the pipeline's epoch
    advances exactly when COMMIT is reached; every request gets exactly one
    ``RefactorOutcome``; a phase result for another refactor, epoch or phase is ignored.
    """

    name = "refactor"
    accepts = (ev.RefactorPipeline, ev.RefactorPhaseDone, Tick)

    def __init__(
        self,
        planner: Callable[[ev.RefactorPipeline, int], PlanSummary],
        phase_timeouts_s: dict[str, float] | None = None,
        max_queued: int = 4,
    ) -> None:
        self.planner = planner
        self.timeouts = dict(DEFAULT_PHASE_TIMEOUTS, **(phase_timeouts_s or {}))
        self.max_queued = max_queued
        self.pipelines: dict[str, PipelineRefactors] = {}
        self._next_id = 1

    def set_epoch(self, pipeline_id: str, epoch: int) -> None:
        """Register a pipeline serving at ``epoch`` (deploys start at 0)."""
        self.pipelines.setdefault(pipeline_id, PipelineRefactors()).epoch = epoch

    def busy(self, pipeline_id: str) -> bool:
        state = self.pipelines.get(pipeline_id)
        return state is not None and state.active is not None

    def handle(self, event, now: float) -> list:
        if isinstance(event, ev.RefactorPipeline):
            return self._requested(event, now)
        if isinstance(event, ev.RefactorPhaseDone):
            return self._phase_done(event, now)
        if isinstance(event, Tick):
            return self._check_deadlines(now)
        return []

    # ---- requests --------------------------------------------------------------------

    def _requested(self, request: ev.RefactorPipeline, now: float) -> list:
        state = self.pipelines.setdefault(request.pipeline_id, PipelineRefactors())
        if state.active is not None:
            if request.dry_run:
                return self._plan_only(request, state, now)
            if len(state.queued) >= self.max_queued:
                reason = (
                    f"refactor {state.active.refactor_id} of pipeline {request.pipeline_id} is in "
                    f"{state.active.phase} and {len(state.queued)} more are queued"
                )
                return self._refuse(request, state, self._new_id(), reason)
            state.queued.append((request, now))
            return [
                Log(
                    "refactor.queued",
                    {"pipeline_id": request.pipeline_id, "epoch": state.epoch, "position": len(state.queued)},
                )
            ]
        return self._start(request, state, now)

    def _new_id(self) -> int:
        refactor_id, self._next_id = self._next_id, self._next_id + 1
        return refactor_id

    def _plan_only(self, request: ev.RefactorPipeline, state: PipelineRefactors, now: float) -> list:
        refactor_id = self._new_id()
        try:
            summary = self.planner(request, refactor_id)
        except RefactorRefused as exc:
            return self._refuse(request, state, refactor_id, str(exc))
        return [
            Send(
                request.sender,
                ev.RefactorOutcome(
                    sender=self.name,
                    reply_to=request.cmd_id,
                    pipeline_id=request.pipeline_id,
                    refactor_id=refactor_id,
                    epoch=state.epoch if summary.from_epoch is None else summary.from_epoch,
                    from_epoch=state.epoch if summary.from_epoch is None else summary.from_epoch,
                    outcome="planned",
                    kind=summary.kind,
                    old_layout=list(summary.source),
                    target=list(summary.target),
                    workers=list(summary.workers),
                    moves=list(summary.moves),
                    kv_layers_moved=list(summary.kv_layers_moved),
                    stage_memory=list(summary.stage_memory),
                    weight_bytes=sum(summary.weight_bytes_by_source.values()),
                    weight_bytes_by_source=dict(summary.weight_bytes_by_source),
                    kv_bytes=summary.kv_bytes_estimate,
                    stall_estimate_s=summary.stall_estimate_s,
                ),
            )
        ]

    def _start(self, request: ev.RefactorPipeline, state: PipelineRefactors, now: float) -> list:
        if request.dry_run:
            return self._plan_only(request, state, now)
        refactor_id = self._new_id()
        fields = {"pipeline_id": request.pipeline_id, "epoch": state.epoch + 1, "refactor_id": refactor_id}
        actions = [Log("refactor.phase_started", fields | {"phase": "PLAN"})]
        try:
            summary = self.planner(request, refactor_id)
        except RefactorRefused as exc:
            return actions + self._refuse(request, state, refactor_id, str(exc))
        if summary.from_epoch is not None:
            state.epoch = summary.from_epoch
        fields["epoch"] = state.epoch + 1
        run = RefactorRun(
            refactor_id,
            request,
            request.sender,
            state.epoch + 1,
            summary.kind,
            list(summary.target),
            now,
            summary=summary,
            workers=list(summary.workers),
        )
        run.phase_seconds["PLAN"] = 0.0
        state.active = run
        actions += [
            Log(
                "refactor.requested",
                {
                    "pipeline_id": request.pipeline_id,
                    "epoch": state.epoch,
                    "refactor_id": refactor_id,
                    "kind": run.kind,
                    "by": request.by,
                    "target": run.target,
                },
            ),
            Log(
                "refactor.phase_finished",
                fields | {"phase": "PLAN", "duration_s": 0.0, "ok": True, "weight_bytes": 0, "kv_bytes": 0},
            ),
        ]
        return actions + self._enter(run, "PREPARE", now)

    def _refuse(self, request: ev.RefactorPipeline, state: PipelineRefactors, refactor_id: int, reason: str) -> list:
        return [
            Log(
                "refactor.refused",
                {
                    "pipeline_id": request.pipeline_id,
                    "epoch": state.epoch,
                    "refactor_id": refactor_id,
                    "reason": reason,
                },
                "warning",
            ),
            Send(
                request.sender,
                ev.RefactorOutcome(
                    sender=self.name,
                    reply_to=request.cmd_id,
                    pipeline_id=request.pipeline_id,
                    refactor_id=refactor_id,
                    epoch=state.epoch,
                    outcome="refused",
                    reason=reason,
                ),
            ),
        ]

    # ---- phases ----------------------------------------------------------------------

    def _enter(self, run: RefactorRun, phase: str, now: float) -> list:
        run.phase, run.phase_started, run.deadline = phase, now, now + self.timeouts[phase]
        pipeline_id = run.request.pipeline_id
        return [
            Log(
                "refactor.phase_started",
                {"pipeline_id": pipeline_id, "epoch": run.epoch, "refactor_id": run.refactor_id, "phase": phase},
            ),
            Tell(
                EXECUTOR,
                ev.RefactorPhase(pipeline_id=pipeline_id, refactor_id=run.refactor_id, epoch=run.epoch, phase=phase),
            ),
        ]

    def _phase_done(self, done: ev.RefactorPhaseDone, now: float) -> list:
        state = self.pipelines.get(done.pipeline_id)
        run = state.active if state else None
        if run is None or done.refactor_id != run.refactor_id or done.epoch != run.epoch or done.phase != run.phase:
            return []
        run.phase_seconds[run.phase] = done.duration_s
        run.weight_bytes += done.weight_bytes
        for source, nbytes in done.weight_bytes_by_source.items():
            run.weight_bytes_by_source[source] = run.weight_bytes_by_source.get(source, 0) + nbytes
        run.unit_sources.update(done.unit_sources)
        if done.workers:
            run.workers = list(done.workers)
        if run.phase == "PRECOPY":
            run.kv_bytes_precopy += done.kv_bytes
            run.precopy_rounds += done.precopy_rounds
        elif run.phase == "SWITCH":
            run.kv_bytes_delta += done.kv_bytes
            if done.ok:
                run.switch = done.switch
        actions = [
            Log(
                "refactor.phase_finished",
                {
                    "pipeline_id": done.pipeline_id,
                    "epoch": run.epoch,
                    "refactor_id": run.refactor_id,
                    "phase": run.phase,
                    "duration_s": done.duration_s,
                    "ok": done.ok,
                    "weight_bytes": done.weight_bytes,
                    "kv_bytes": done.kv_bytes,
                }
                | ({"reason": done.reason} if done.reason else {}),
                "info" if done.ok else "warning",
            )
        ]
        return actions + self._advance(state, run, done.ok, done.reason, now)

    def _advance(self, state: PipelineRefactors, run: RefactorRun, ok: bool, reason: str, now: float) -> list:
        if run.phase == "ABORT":
            return self._finish(state, run, "aborted", run.failure or reason, now)
        if not ok and run.phase != "COMMIT":
            run.failure = f"{run.phase} failed: {reason}"
            return self._enter(run, "ABORT", now)
        if run.phase == "COMMIT":
            state.epoch = run.epoch
            return self._finish(state, run, "committed", "" if ok else f"COMMIT cleanup failed: {reason}", now)
        return self._enter(run, WORK_PHASES[WORK_PHASES.index(run.phase) + 1], now)

    def _finish(self, state: PipelineRefactors, run: RefactorRun, outcome: str, reason: str, now: float) -> list:
        pipeline_id = run.request.pipeline_id
        state.active = None
        duration = now - run.started
        if outcome == "committed":
            timing = run.switch or ev.SwitchTiming()
            log = Log(
                "refactor.committed",
                {
                    "pipeline_id": pipeline_id,
                    "epoch": run.epoch,
                    "refactor_id": run.refactor_id,
                    "duration_s": duration,
                    "stall_s": timing.stall_s,
                    "switch_s": timing.switch_s,
                    "weight_bytes": run.weight_bytes,
                    "kv_bytes": run.kv_bytes,
                },
            )
        else:
            log = Log(
                "refactor.aborted",
                {
                    "pipeline_id": pipeline_id,
                    "epoch": run.epoch,
                    "refactor_id": run.refactor_id,
                    "phase": run.failure.split(" ", 1)[0],
                    "reason": reason,
                },
                "warning",
            )
        summary = run.summary
        reply = ev.RefactorOutcome(
            sender=self.name,
            reply_to=run.request.cmd_id,
            pipeline_id=pipeline_id,
            refactor_id=run.refactor_id,
            epoch=state.epoch,
            outcome=outcome,
            reason=reason,
            kind=run.kind,
            from_epoch=run.epoch - 1,
            old_layout=list(summary.source) if summary else [],
            target=run.target,
            phase_seconds=dict(run.phase_seconds),
            weight_bytes=run.weight_bytes,
            weight_bytes_by_source=dict(run.weight_bytes_by_source),
            unit_sources=dict(run.unit_sources),
            kv_layers_moved=list(summary.kv_layers_moved) if summary else [],
            kv_bytes=run.kv_bytes,
            kv_bytes_precopy=run.kv_bytes_precopy,
            kv_bytes_delta=run.kv_bytes_delta,
            precopy_rounds=run.precopy_rounds,
            switch=run.switch,
            workers=list(run.workers),
            stage_memory=list(summary.stage_memory) if summary else [],
        )
        actions = [log, Send(run.requester, reply)]
        if summary is not None and summary.engine_host and summary.engine_host != run.requester:
            actions.append(Send(summary.engine_host, reply))
        if state.queued:
            request, _ = state.queued.popleft()
            actions += self._start(request, state, now)
        return actions

    def _check_deadlines(self, now: float) -> list:
        actions = []
        for state in self.pipelines.values():
            run = state.active
            if run is None or now <= run.deadline:
                continue
            reason = f"{run.phase} did not finish within {self.timeouts[run.phase]:.0f}s"
            run.phase_seconds[run.phase] = now - run.phase_started
            actions.append(
                Log(
                    "refactor.phase_finished",
                    {
                        "pipeline_id": run.request.pipeline_id,
                        "epoch": run.epoch,
                        "refactor_id": run.refactor_id,
                        "phase": run.phase,
                        "duration_s": now - run.phase_started,
                        "ok": False,
                        "weight_bytes": 0,
                        "kv_bytes": 0,
                        "reason": reason,
                    },
                    "warning",
                )
            )
            if run.phase == "ABORT":
                actions += self._finish(state, run, "aborted", f"{run.failure}; ABORT timed out", now)
            else:
                actions += self._advance(state, run, False, reason, now)
        return actions
