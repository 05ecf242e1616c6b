"""The policy as a state machine: traffic in, decisions out, in virtual time (no sockets, no processes).

The monitor, policy and allocator are the controller's own actors; the cluster around them is the replay's
virtual cluster, serving at the candidates' throughput."""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest

from common import events as ev
from common.config import PolicyConfig
from common.model.partition import unit_costs
from common.model.spec import ModelSpec
from common.model.units import unit_names
from controlplane.actor import Log, Send, Tell, Tick
from controlplane.monitor import Monitor
from controlplane.policy.actor import Policy
from controlplane.policy.candidates import Candidate, granularity_scores, queue_stages, replicas_needed
from controlplane.policy.placement import stage_memory_of
from controlplane.policy.rebalance import rebalanced_layout
from controlplane.simulation.replay import replay
from controlplane.simulation.traces import TracedRequest, gamma_arrivals
from controlplane.simulation.virtual_cluster import local_inventory

# Throughput grows with stages (more micro-batches in flight), latency a little (one more hop each).
CANDIDATES = [
    Candidate(1, 120.0, 0.030, measured=True),
    Candidate(2, 200.0, 0.034, measured=True),
    Candidate(3, 260.0, 0.038, measured=True),
    Candidate(4, 300.0, 0.042, measured=True),
]
CONFIG = PolicyConfig(interval_s=5.0, window_s=30.0, cooldown_s=30.0, scale_in_idle_s=60.0, max_replicas=4)


def run(requests, model_dir, config=CONFIG, workers=8, memory=4 << 30, **kwargs):
    return replay(requests, str(model_dir), config, CANDIDATES, local_inventory(workers, memory), **kwargs)


def targets(decisions: list[ev.PolicyDecision]) -> list[int]:
    """The stage count each issued granularity decision steered to, in order."""
    return [d.stages_to for d in decisions if d.kind == "granularity" and d.outcome != "held"]


def test_eq4_alone_prefers_finer_stages_as_the_cv_grows():
    chosen = []
    for cv in (0.5, 1, 2, 4, 8, 16):
        scores = granularity_scores(CANDIDATES, cv, CONFIG)
        chosen.append(CANDIDATES[scores.index(max(scores))].num_stages)
    assert chosen == sorted(chosen) and chosen[0] == 1 and chosen[-1] == 4


def test_the_chosen_granularity_is_non_decreasing_in_the_cv_of_arrivals(tiny_model):
    """Arrivals at CV 1, 2, 4, 8 with the same mean rate: the granularity the policy steers to, measured as
    the median stage count of its replicas over the run, never falls as the CV grows."""
    medians = []
    for cv in (1, 2, 4, 8):
        result = run(gamma_arrivals(600, rate=0.8, cv=cv, seed=7, output_tokens=64), tiny_model)
        stages = [1] + targets(result.decisions)
        medians.append(statistics.median(stages))
    assert medians == sorted(medians), medians
    assert medians[-1] > medians[0], medians


def test_a_steady_trace_changes_the_granularity_at_most_once_per_cooldown(tiny_model):
    result = run(gamma_arrivals(900, rate=1.0, cv=1.0, seed=3, output_tokens=64), tiny_model)
    changes = []  # (time, new target) whenever the target differs from the previous one
    previous = 1
    for decision in result.decisions:
        if decision.kind == "granularity" and decision.outcome != "held" and decision.stages_to != previous:
            changes.append(decision.at)
            previous = decision.stages_to
    assert all(b - a >= CONFIG.cooldown_s for a, b in zip(changes, changes[1:])), changes
    assert len(changes) <= 1 + result.duration_s // CONFIG.cooldown_s


def test_a_rate_step_adds_replicas_within_the_reaction_time_and_idleness_removes_them(tiny_model):
    step_at, calm_until = 120.0, 300.0
    slow = [r for r in gamma_arrivals(step_at, rate=0.2, cv=1.0, seed=1, output_tokens=64)]
    fast = [
        TracedRequest(step_at + r.at, r.prompt_tokens, r.output_tokens)
        for r in gamma_arrivals(calm_until - step_at, rate=6.0, cv=1.0, seed=2, output_tokens=64)
    ]
    tail = [TracedRequest(calm_until + 600.0, 16, 4)]  # one late request keeps the replay running while idle
    result = run(slow + fast + tail, tiny_model)
    outs = [d for d in result.decisions if d.kind == "scale_out" and d.outcome == "ready"]
    ins = [d for d in result.decisions if d.kind == "scale_in" and d.outcome == "removed"]
    assert not [d for d in outs if d.at < step_at], "no replica is added before the step"
    reaction = CONFIG.window_s / 2 + CONFIG.interval_s  # the window must see the new rate, then one decision
    assert outs and outs[0].at - step_at <= reaction
    assert ins and all(d.at > calm_until + CONFIG.scale_in_idle_s - CONFIG.window_s for d in ins)
    assert ins[-1].replicas_to == CONFIG.min_replicas


def test_nothing_is_decided_while_paused_or_static(tiny_model):
    requests = gamma_arrivals(200, rate=5.0, cv=4.0, seed=5, output_tokens=64)
    assert run(requests, tiny_model).decisions
    assert not run(requests, tiny_model, config=replace(CONFIG, mode="static")).decisions


def test_a_change_the_cluster_cannot_place_is_held_with_the_reason(tiny_model):
    room_for_one = stage_memory_of(str(tiny_model), 1)[0] * 3 // 2
    result = run(
        gamma_arrivals(200, rate=6.0, cv=4.0, seed=2, output_tokens=64), tiny_model, workers=1, memory=room_for_one
    )
    held = [d for d in result.decisions if d.outcome == "held"]
    assert held and all(d.reason for d in held)
    assert not [d for d in result.decisions if d.outcome == "issued"]
    assert all(len(layout["replicas"]) == 1 for layout in result.layouts), result.layouts


def test_every_decision_carries_its_inputs_and_scores(tiny_model):
    result = run(gamma_arrivals(300, rate=3.0, cv=4.0, seed=9, output_tokens=64), tiny_model)
    assert result.decisions
    for decision in result.decisions:
        assert decision.arrival_rate > 0 and decision.queues
        assert [c.num_stages for c in decision.candidates] == [1, 2, 3, 4]
        assert all(c.score > 0 and c.replicas >= 1 for c in decision.candidates)
        assert decision.outcome in ("committed", "ready", "removed", "held", "refused", "failed")


def test_eq5_replicas_and_eq11_queue_expansion():
    config = PolicyConfig()
    one = CANDIDATES[0]
    assert replicas_needed(one, 0.0, config) == 0
    per_replica = one.throughput / (config.beta1 + config.beta2) * config.target_utilization
    assert replicas_needed(one, per_replica * 2.5, config) == 3
    assert queue_stages(0, 8.0, 4, config) == 1
    assert queue_stages(config.queue_capacity, 8.0, 4, config) == 3  # floor: G_max is approached, not reached
    by_cv = [queue_stages(config.queue_capacity / 2, cv, 4, config) for cv in (0.5, 1, 2, 4, 8)]
    assert by_cv == sorted(by_cv)


# ---- congestion -----------------------------------------------------------------------------


def _register(monitor: Monitor, worker: str) -> None:
    device = ev.DeviceInfo(
        device_id=worker, kind="cpu", name="cpu", memory_total=1 << 30, memory_free=1 << 30, host="h"
    )
    monitor.handle(ev.RegisterWorker(sender=worker, cmd_id=1, worker_id=worker, host="h", pid=1, device=device), 0.0)


def test_a_stage_whose_queue_keeps_growing_is_detected_within_three_intervals_and_rebalanced(tiny_model):
    spec = ModelSpec.from_dir(tiny_model)
    names = unit_names(spec.num_layers)
    units = [names[:3], names[3:]]
    config = PolicyConfig(interval_s=1.0, cooldown_s=0.0)
    monitor = Monitor(policy=config)
    for worker in ("w0", "w1"):
        _register(monitor, worker)
    stages = [ev.StageView(stage=k, worker_id=f"w{k}", units=u) for k, u in enumerate(units)]
    view = ev.PipelineView(
        pipeline_id="p0", state="READY", epoch=0, model_dir=str(tiny_model), engine_host="e", stages=stages
    )
    monitor.handle(ev.PipelineUpdated(pipeline=view), 0.0)
    policy = Policy(config, lambda *_: CANDIDATES[1:2])  # two stages is the only granularity: no split or merge
    detected_at, refactor = None, None
    for interval, queue in enumerate([1, 3, 6, 10, 15]):
        now = float(interval + 1)
        for k, worker in enumerate(("w0", "w1")):
            metrics = ev.StageMetrics(
                pipeline_id="p0",
                epoch=0,
                stage=k,
                queue_length=queue if k == 1 else 0,
                busy_fraction=1.0 if k == 1 else 0.3,
                kv_blocks_used=0,
                kv_blocks_free=0,
                tokens_per_s=0.0,
            )
            monitor.handle(ev.WorkerMetrics(sender=worker, worker_id=worker, stages=[metrics]), now)
        for action in monitor.handle(Tick(now), now):
            if isinstance(action, Log) and action.name == "monitor.congestion" and detected_at is None:
                detected_at = interval + 1
            if isinstance(action, Tell) and action.actor == "policy":
                for out in policy.handle(action.event, now):
                    if isinstance(out, Tell) and isinstance(out.event, ev.RefactorPipeline) and refactor is None:
                        refactor = out.event
    assert detected_at is not None and detected_at <= 3
    assert refactor is not None and refactor.layout and refactor.by == "policy"
    costs = {u.name: u.flops_per_token for u in unit_costs(spec, context_tokens=512)}
    new_stage = refactor.layout[1].split("..")
    new_units = names[names.index(new_stage[0]) : names.index(new_stage[1]) + 1]
    assert sum(costs[u] for u in new_units) < sum(costs[u] for u in units[1])
    assert [
        u for r in refactor.layout for u in names[names.index(r.split("..")[0]) : names.index(r.split("..")[1]) + 1]
    ] == names


def test_rebalance_moves_one_unit_towards_the_lighter_neighbour():
    stages = [["a", "b"], ["c", "d", "e"], ["f"]]
    assert rebalanced_layout(stages, 1, [5, 9, 0]) == ["a..b", "c..d", "e..f"]
    assert rebalanced_layout(stages, 1, [0, 9, 5]) == ["a..c", "d..e", "f..f"]
    assert rebalanced_layout(stages, 2, [0, 0, 9]) is None


# ---- operators ------------------------------------------------------------------------------


def test_pause_resume_and_the_decision_log_are_answered_to_the_asker():
    policy = Policy(CONFIG, lambda *_: CANDIDATES)
    paused = policy.handle(ev.PolicyControl(sender="op", cmd_id=1, action="pause"), 0.0)
    reply = next(a.event for a in paused if isinstance(a, Send))
    assert reply.view.paused and policy.paused
    bad = policy.handle(ev.PolicyControl(sender="op", cmd_id=2, action="stop"), 0.0)
    assert isinstance(bad[0].event, ev.ErrorReply) and "pause" in bad[0].event.message
    resumed = policy.handle(ev.PolicyControl(sender="op", cmd_id=3, action="resume"), 0.0)
    assert not next(a.event for a in resumed if isinstance(a, Send)).view.paused
    events = policy.handle(ev.PolicyEventsRequest(sender="op", cmd_id=4, after=0), 0.0)
    assert events[0].peer == "op" and events[0].event.decisions == []


def _snapshot(model_dir: str, at: float, cv: float, stages: int = 1) -> ev.TrafficSnapshot:
    units = [["embed", "L0.attn", "L0.mlp", "L1.attn", "L1.mlp", "L2.attn", "L2.mlp", "head"]]
    if stages == 2:
        units = [units[0][:4], units[0][4:]]
    pipeline = ev.PipelineLoad(pipeline_id="p0", state="READY", epoch=0, stage_units=units, engine_host="e")
    return ev.TrafficSnapshot(
        model_dir=model_dir, at=at, window_s=30, arrivals=30, arrival_rate=0.1, cv=cv, trend=0.0, pipelines=[pipeline]
    )


@pytest.mark.parametrize("outcome,final", [("committed", "committed"), ("aborted", "failed"), ("refused", "refused")])
def test_a_refactor_outcome_ends_the_change_in_flight(outcome, final):
    config = PolicyConfig(confirm_intervals=1, cooldown_s=0.0)
    policy = Policy(config, lambda *_: CANDIDATES[:2])
    actions = policy.handle(_snapshot("m", 1.0, cv=8.0), 1.0)
    request = next(a.event for a in actions if isinstance(a, Tell) and isinstance(a.event, ev.RefactorPipeline))
    assert request.num_stages == 2 and policy.models["m"].in_flight is not None
    assert not [
        a for a in policy.handle(_snapshot("m", 2.0, cv=8.0), 2.0) if isinstance(a, Tell) and a.actor == "refactor"
    ]
    reply = ev.RefactorOutcome(
        sender="refactor", reply_to=request.cmd_id, pipeline_id="p0", refactor_id=1, epoch=1, outcome=outcome
    )
    logs = policy.handle(reply, 3.0)
    assert policy.models["m"].in_flight is None
    assert policy.decisions[-1].outcome == final and policy.decisions[-1].duration_s == 2.0
    assert any(isinstance(a, Log) and a.name == "policy.outcome" for a in logs)
    stranger = ev.RefactorOutcome(
        sender="refactor", reply_to=99, pipeline_id="p0", refactor_id=1, epoch=1, outcome="committed"
    )
    assert policy.handle(stranger, 4.0) == []


def test_with_a_minimum_of_zero_an_idle_model_is_scaled_to_zero_and_back_when_requests_come(tiny_model):
    config = replace(CONFIG, min_replicas=0)
    busy = gamma_arrivals(60, rate=1.0, cv=1.0, seed=8, output_tokens=64)
    late = [TracedRequest(400.0 + i, 16, 8) for i in range(3)] + [TracedRequest(440.0, 16, 8)]
    result = run(busy + late, tiny_model, config=config)
    to_zero = [d for d in result.decisions if d.kind == "scale_in" and d.replicas_to == 0]
    assert to_zero and to_zero[0].outcome == "removed" and to_zero[0].at < 400.0
    back = [d for d in result.decisions if d.kind == "scale_out" and d.at >= 400.0]
    assert back and back[0].outcome == "ready" and back[0].replicas_from == 0
    assert back[0].at - 400.0 <= CONFIG.interval_s and back[0].duration_s > 0  # the cold start, measured


def test_a_model_an_operator_undeployed_is_not_brought_back():
    policy = Policy(replace(CONFIG, min_replicas=0), lambda *_: CANDIDATES)
    policy.handle(_snapshot("m", 1.0, cv=1.0), 1.0)
    gone = ev.TrafficSnapshot(model_dir="m", at=2.0, window_s=30, arrivals=30, arrival_rate=5.0, cv=1.0, trend=0.0)
    assert not [a for a in policy.handle(gone, 2.0) if isinstance(a, Tell) and a.actor == "coordinator"]
