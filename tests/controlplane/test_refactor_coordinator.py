"""The refactor coordinator as a pure state machine: phases, aborts, timeouts, queueing, refusals."""

from dataclasses import dataclass, field

import pytest

from common import events as ev
from common.errors import RefactorRefused
from controlplane.actor import Log, Send, Tell, Tick
from controlplane.refactor.coordinator import EXECUTOR, RefactorCoordinator


@dataclass
class Summary:
    kind: str
    target: list
    source: list = field(default_factory=list)
    workers: list = field(default_factory=list)
    moves: list = field(default_factory=list)
    kv_layers_moved: list = field(default_factory=list)
    stage_memory: list = field(default_factory=list)
    weight_bytes_by_source: dict = field(default_factory=dict)
    kv_bytes_estimate: int = 0
    stall_estimate_s: float = 0.0
    from_epoch: int | None = None
    engine_host: str = ""


def planner(request, refactor_id):
    if request.num_stages == 99:
        raise RefactorRefused("99 stages do not fit the devices")
    return Summary("split", [f"stage{i}" for i in range(request.num_stages or 1)])


def request(cmd_id=1, stages=4, **kw):
    return ev.RefactorPipeline(cmd_id=cmd_id, sender="client", pipeline_id="p", num_stages=stages, **kw)


def phase_of(actions):
    tells = [a.event for a in actions if isinstance(a, Tell)]
    assert all(isinstance(t, ev.RefactorPhase) for t in tells)
    return tells[-1].phase if tells else None


def done(phase_event, ok=True, **kw):
    return ev.RefactorPhaseDone(
        pipeline_id=phase_event.pipeline_id,
        refactor_id=phase_event.refactor_id,
        epoch=phase_event.epoch,
        phase=phase_event.phase,
        ok=ok,
        **kw,
    )


def last_tell(actions):
    return [a.event for a in actions if isinstance(a, Tell)][-1]


def outcomes(actions):
    return [a.event for a in actions if isinstance(a, Send) and isinstance(a.event, ev.RefactorOutcome)]


def logs(actions):
    return [a.name for a in actions if isinstance(a, Log)]


def test_phases_run_in_order_and_commit_advances_the_epoch():
    machine = RefactorCoordinator(planner)
    machine.set_epoch("p", 3)
    actions = machine.handle(request(), 0.0)
    assert logs(actions)[:3] == ["refactor.phase_started", "refactor.requested", "refactor.phase_finished"]
    seen = []
    for step in range(4):
        tell = last_tell(actions)
        assert tell.epoch == 4 and all(a.actor == EXECUTOR for a in actions if isinstance(a, Tell))
        seen.append(tell.phase)
        switch = ev.SwitchTiming(stall_s=0.01, switch_s=0.02) if tell.phase == "SWITCH" else None
        actions = machine.handle(done(tell, duration_s=0.5, kv_bytes=10, switch=switch), 1.0 + step)
    assert seen == ["PREPARE", "PRECOPY", "SWITCH", "COMMIT"]
    [outcome] = outcomes(actions)
    assert outcome.outcome == "committed" and outcome.epoch == 4 and outcome.reply_to == 1
    assert (outcome.kv_bytes, outcome.kv_bytes_precopy, outcome.kv_bytes_delta) == (20, 10, 10), (
        "KV moves in PRECOPY and SWITCH"
    )
    assert (outcome.stall_s, outcome.switch_s) == (0.01, 0.02)
    assert set(outcome.phase_seconds) == {"PLAN", "PREPARE", "PRECOPY", "SWITCH", "COMMIT"}
    assert "refactor.committed" in logs(actions)
    assert not machine.busy("p") and machine.pipelines["p"].epoch == 4


def test_the_pipelines_engine_host_is_told_the_outcome_too():
    machine = RefactorCoordinator(lambda request, _id: Summary("split", ["a", "b"], engine_host="engine-0"))
    actions = machine.handle(request(), 0.0)
    for step in range(4):
        actions = machine.handle(done(last_tell(actions)), 1.0 + step)
    told = {a.peer: a.event for a in actions if isinstance(a, Send) and isinstance(a.event, ev.RefactorOutcome)}
    assert set(told) == {"client", "engine-0"}
    assert told["engine-0"] is told["client"] and told["client"].outcome == "committed"


@pytest.mark.parametrize("failing", ["PREPARE", "PRECOPY", "SWITCH"])
def test_a_failed_phase_aborts_and_keeps_the_epoch(failing):
    machine = RefactorCoordinator(planner)
    actions = machine.handle(request(), 0.0)
    while (tell := last_tell(actions)).phase != failing:
        actions = machine.handle(done(tell), 1.0)
    actions = machine.handle(done(tell, ok=False, reason="worker 3 died"), 2.0)
    abort = last_tell(actions)
    assert abort.phase == "ABORT" and not outcomes(actions)
    actions = machine.handle(done(abort), 3.0)
    [outcome] = outcomes(actions)
    assert outcome.outcome == "aborted" and outcome.epoch == 0
    assert f"{failing} failed: worker 3 died" in outcome.reason
    aborted = next(a for a in actions if isinstance(a, Log) and a.name == "refactor.aborted")
    assert aborted.fields["phase"] == failing


def test_a_phase_past_its_deadline_counts_as_failed():
    machine = RefactorCoordinator(planner, phase_timeouts_s={"PREPARE": 5.0, "ABORT": 2.0})
    actions = machine.handle(request(), 0.0)
    assert machine.handle(Tick(4.0), 4.0) == []
    actions = machine.handle(Tick(6.0), 6.0)
    assert last_tell(actions).phase == "ABORT"
    actions = machine.handle(Tick(9.0), 9.0)
    [outcome] = outcomes(actions)
    assert outcome.outcome == "aborted" and "PREPARE did not finish within 5s" in outcome.reason
    assert "ABORT timed out" in outcome.reason


def test_late_and_foreign_phase_results_are_ignored():
    machine = RefactorCoordinator(planner)
    actions = machine.handle(request(), 0.0)
    prepare = last_tell(actions)
    stale = ev.RefactorPhaseDone(
        pipeline_id="p", refactor_id=prepare.refactor_id, epoch=prepare.epoch, phase="SWITCH", ok=True
    )
    assert machine.handle(stale, 1.0) == []
    other = ev.RefactorPhaseDone(pipeline_id="q", refactor_id=1, epoch=1, phase="PREPARE", ok=True)
    assert machine.handle(other, 1.0) == []
    assert machine.pipelines["p"].active.phase == "PREPARE"


def test_requests_during_a_refactor_are_queued_then_refused_when_the_queue_is_full():
    machine = RefactorCoordinator(planner, max_queued=1)
    actions = machine.handle(request(1), 0.0)
    assert logs(machine.handle(request(2, stages=2), 0.1)) == ["refactor.queued"]
    refused = outcomes(machine.handle(request(3, stages=3), 0.2))
    assert refused[0].outcome == "refused" and refused[0].reply_to == 3 and "queued" in refused[0].reason
    while outcomes(actions) == []:
        actions = machine.handle(done(last_tell(actions)), 1.0)
    assert [o.reply_to for o in outcomes(actions)] == [1]
    queued = last_tell(actions)
    assert queued.phase == "PREPARE" and queued.epoch == 2
    assert machine.pipelines["p"].active.request.cmd_id == 2


def test_a_plan_that_cannot_fit_is_refused_before_any_phase_runs():
    machine = RefactorCoordinator(planner)
    actions = machine.handle(request(stages=99), 0.0)
    assert not [a for a in actions if isinstance(a, Tell)]
    [outcome] = outcomes(actions)
    assert outcome.outcome == "refused" and "do not fit" in outcome.reason
    assert not machine.busy("p")


def test_a_dry_run_plans_without_starting():
    machine = RefactorCoordinator(planner)
    actions = machine.handle(request(stages=3, dry_run=True), 0.0)
    [outcome] = outcomes(actions)
    assert outcome.outcome == "planned" and outcome.target == ["stage0", "stage1", "stage2"]
    assert not machine.busy("p") and not [a for a in actions if isinstance(a, Tell)]


def test_commit_cleanup_failure_still_commits():
    machine = RefactorCoordinator(planner)
    actions = machine.handle(request(), 0.0)
    while (tell := last_tell(actions)).phase != "COMMIT":
        actions = machine.handle(done(tell), 1.0)
    [outcome] = outcomes(machine.handle(done(tell, ok=False, reason="unload failed"), 2.0))
    assert outcome.outcome == "committed" and outcome.epoch == 1 and "cleanup" in outcome.reason
