"""``fpctl plan --trace``: a request trace replayed through the monitor, policy and allocator actors in virtual
time, without serving. The actors are the controller's own; only the cluster around them is virtual
(``controlplane.simulation.virtual_cluster``).
"""

from __future__ import annotations

from dataclasses import dataclass

from common import events as ev
from common.config import PolicyConfig
from common.topology import ResourceGraph
from controlplane.actor import Log, Tell, Tick
from controlplane.allocator import Allocator
from controlplane.monitor import Monitor
from controlplane.policy.actor import Policy
from controlplane.policy.candidates import Candidate
from controlplane.policy.placement import AllocatorCapacity
from controlplane.simulation.traces import TracedRequest
from controlplane.simulation.virtual_cluster import TICK_S, VirtualCluster


@dataclass
class ReplayResult:
    """Each decision of the replay (in order) and the layout after it, plus the trace's extent."""

    decisions: list[ev.PolicyDecision]
    layouts: list[dict]
    requests: int
    duration_s: float


def replay(
    requests: list[TracedRequest],
    model_dir: str,
    config: PolicyConfig,
    candidates: list[Candidate],
    inventory: ResourceGraph,
    *,
    initial_stages: int = 1,
    max_num_seqs: int = 16,
    cv: float = 0.0,
) -> ReplayResult:
    """Replay ``requests`` (times in s from 0) against one model starting as one replica of ``initial_stages``."""
    allocator = Allocator(inventory, cv=cv)
    monitor = Monitor(policy=config)
    policy = Policy(config, lambda *_: candidates, AllocatorCapacity(allocator))
    cluster = VirtualCluster(model_dir, candidates, allocator, max_num_seqs=max_num_seqs)
    actors = {"monitor": monitor, "policy": policy}
    queue: list[tuple[str, object]] = []

    def deliver(pairs, now: float) -> None:
        queue.extend(pairs)
        while queue:
            target, event = queue.pop(0)
            for action in actors[target].handle(event, now):
                queue.extend(route(action, now))

    def route(action, now: float) -> list[tuple[str, object]]:
        if isinstance(action, Log):
            return []
        event = action.event
        if isinstance(event, ev.DeployPipeline):
            return cluster.deploy(event, now)
        if isinstance(event, ev.RefactorPipeline):
            return cluster.refactor(event, now)
        if isinstance(event, ev.DrainPipeline):
            return cluster.drain(event, now)
        if isinstance(event, ev.UndeployPipeline):
            return cluster.undeploy(event, now)
        target = action.actor if isinstance(action, Tell) else action.peer
        return [(target, event)] if target in actors else []

    first = ev.DeployPipeline(cmd_id=0, pipeline_id="p0", model_dir=model_dir, num_stages=initial_stages)
    for target, event in cluster.deploy(first, 0.0):
        if target == "monitor":
            deliver([(target, event)], 0.0)
    cluster.replicas["p0"].ready_at = 0.0
    end = (requests[-1].at if requests else 0.0) + config.interval_s
    now, index, layouts = 0.0, 0, []
    seen = 0
    while now <= end:
        while index < len(requests) and requests[index].at <= now:
            cluster.admit(requests[index], now)
            index += 1
        deliver(cluster.serve(now, TICK_S), now)
        deliver([("monitor", cluster.traffic_report())], now)
        deliver([("monitor", Tick(now))], now)
        for decision in list(policy.decisions)[seen:]:
            layouts.append(_layout_summary(cluster, decision.seq))
        seen = len(policy.decisions)
        now += TICK_S
    return ReplayResult(list(policy.decisions), layouts, len(requests), end)


def _layout_summary(cluster: VirtualCluster, seq: int) -> dict:
    return {
        "seq": seq,
        "replicas": {
            r.pipeline_id: {"stages": r.num_stages, "devices": list(r.workers), "draining": r.draining}
            for r in cluster.replicas.values()
        },
    }
