"""Hosts the refactor coordinator in-process for the offline ``LLM``: a thread that feeds it
requests and phase results and runs the phases it asks for."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

from common import events as ev
from common.errors import PipelineError
from common.logging import emit, get_logger
from controlplane.actor import Log, Send, Tell, Tick
from controlplane.refactor_machine import EXECUTOR, RefactorCoordinator
from dataplane.refactor_executor import RefactorExecutor
from dataplane.refactor_report import RefactorReport

REQUESTER = "llm"


@dataclass
class Waiter:
    done: threading.Event = field(default_factory=threading.Event)
    outcome: ev.RefactorOutcome | None = None
    report: RefactorReport | None = None
    plan: dict | None = None


class RefactorService:
    """The offline pipeline's refactor coordinator and executor on one thread.

    Invariants: requests reach the coordinator between phases, so a request during a
    refactor is queued or refused by the coordinator, not held back by this thread;
    phases run one at a time; every submitted request gets exactly one outcome;
    ``close()`` stops the thread (a phase in progress finishes or hits its deadline first).
    """

    def __init__(self, pipeline, pipeline_id: str = "offline", phase_timeouts_s: dict[str, float] | None = None) -> None:
        self.pipeline_id = pipeline_id
        self.executor = RefactorExecutor(pipeline)
        self.machine = RefactorCoordinator(self._plan, phase_timeouts_s)
        self.machine.set_epoch(pipeline_id, pipeline.epoch)
        self.log = get_logger(actor="refactor", pipeline_id=pipeline_id)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiters: dict[int, Waiter] = {}
        self._rates: dict[int, float] = {}
        self._cmd_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tells: list[ev.RefactorPhase] = []
        self.thread = threading.Thread(target=self._run, name="flexpipe-refactor", daemon=True)
        self.thread.start()

    def submit(self, num_stages=None, layout=None, migrate=(), dry_run=False, bytes_per_s: float = 0.0,
               by: str = "api", timeout_s: float = 600.0) -> Waiter:
        """Hand a request to the coordinator and wait (bounded) for its outcome."""
        if self._stop.is_set() or not self.thread.is_alive():
            raise PipelineError("the refactor service is stopped")
        with self._lock:
            cmd_id = next(self._cmd_ids)
            waiter = self._waiters[cmd_id] = Waiter()
            self._rates[cmd_id] = bytes_per_s
        self._inbox.put(ev.RefactorPipeline(cmd_id=cmd_id, sender=REQUESTER, pipeline_id=self.pipeline_id,
                                            num_stages=num_stages, layout=list(layout) if layout else None,
                                            migrate=list(migrate), dry_run=dry_run, by=by))
        if not waiter.done.wait(timeout_s):
            raise PipelineError(f"refactor request {cmd_id} got no outcome within {timeout_s:.0f}s")
        return waiter

    def current(self) -> dict | None:
        """The refactor in progress: its id, phase, target epoch and the worker pids of the target layout."""
        run = self.machine.pipelines[self.pipeline_id].active
        if run is None:
            return None
        work = self.executor.works.get(run.refactor_id)
        workers = [w for w in work.plan.workers if w >= 0] if work is not None else []
        processes = self.executor.processes.processes
        return {"refactor_id": run.refactor_id, "phase": run.phase, "epoch": run.epoch, "kind": run.kind,
                "worker_pids": [processes[w].pid for w in workers if w in processes]}

    def _plan(self, request: ev.RefactorPipeline, refactor_id: int):
        plan = self.executor.plan(request, refactor_id, self._rates.pop(request.cmd_id, 0.0))
        waiter = self._waiters.get(request.cmd_id)
        if waiter is not None:
            waiter.plan = plan.describe(self.executor.pipeline.unit_names)
        if request.dry_run:
            self.executor.works.pop(refactor_id, None)
        return _Summary(plan.kind, plan.new_layout.describe(self.executor.pipeline.unit_names))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take_requests(block=True)
            while self._tells and not self._stop.is_set():
                phase = self._tells.pop(0)
                deadline = time.monotonic() + self.machine.timeouts[phase.phase]
                report = self.executor.report(phase.refactor_id)
                done = self.executor.run(phase, deadline)
                self._carry_out(self.machine.handle(done, time.monotonic()), report)
                self._take_requests(block=False)
                self._carry_out(self.machine.handle(Tick(time.monotonic()), time.monotonic()), report)

    def _take_requests(self, block: bool) -> None:
        while True:
            try:
                request = self._inbox.get(timeout=0.2) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            self._carry_out(self.machine.handle(request, time.monotonic()), None)

    def _carry_out(self, actions: list, report: RefactorReport | None) -> None:
        for action in actions:
            if isinstance(action, Log):
                emit(self.log, action.name, action.level, **action.fields)
            elif isinstance(action, Tell) and action.actor == EXECUTOR:
                self._tells.append(action.event)
            elif isinstance(action, Send):
                self._answer(action.event, report)

    def _answer(self, outcome: ev.RefactorOutcome, report: RefactorReport | None) -> None:
        with self._lock:
            waiter = self._waiters.pop(outcome.reply_to, None)
            self._rates.pop(outcome.reply_to, None)
        if waiter is None:
            return
        if report is not None and report.refactor_id == outcome.refactor_id:
            report.outcome, report.reason, report.epoch = outcome.outcome, outcome.reason, outcome.epoch
            report.phase_seconds = dict(outcome.phase_seconds)
            waiter.report = report
        waiter.outcome = outcome
        waiter.done.set()

    def close(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        with self._lock:
            waiters, self._waiters = list(self._waiters.values()), {}
        for waiter in waiters:
            waiter.done.set()


@dataclass(frozen=True, slots=True)
class _Summary:
    kind: str
    target: list[str]
