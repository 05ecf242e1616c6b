"""The cluster around the control-plane actors when a trace is replayed in virtual time (``fpctl plan --trace``).

``VirtualCluster`` stands in
for the deploy and refactor coordinators and the engine host: it places deploys and refactors with the
allocator at once and makes them ready after ``deploy_s`` / ``refactor_s``, and it serves the traced
requests with a processor-sharing model of each replica (throughput T_K and latency L_K of the policy's own
candidates, at most ``max_num_seqs`` requests running, the rest waiting), reporting engine metrics and
completions the way a gateway and its engines do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common import events as ev
from common.model.partition import partition_model
from common.model.spec import ModelSpec
from common.model.units import Layout, unit_names
from common.topology import Device, ResourceGraph
from controlplane.actor import Send
from controlplane.allocator import Allocator
from controlplane.policy.candidates import Candidate
from controlplane.policy.estimate import CONTEXT_TOKENS
from controlplane.policy.placement import stage_memory_of
from controlplane.simulation.traces import TracedRequest

HOST = "virtual-engine-host"
TICK_S = 0.5


@dataclass
class ServedRequest:
    arrival: float
    output_tokens: int
    started: float | None = None
    first_token: float | None = None
    produced: float = 0.0


@dataclass
class VirtualReplica:
    pipeline_id: str
    num_stages: int
    layout: list[str]
    workers: list[str]
    ready_at: float
    epoch: int = 0
    draining: bool = False
    running: list[ServedRequest] = field(default_factory=list)
    waiting: list[ServedRequest] = field(default_factory=list)


def local_inventory(workers: int, memory: int) -> ResourceGraph:
    """``workers`` CPU devices of ``memory`` bytes on one server: the graph of ``fpctl up``'s local cluster."""
    graph = ResourceGraph()
    for i in range(workers):
        graph.add_device(Device(f"worker-{i}", "cpu", "cpu", memory, memory, "localhost", "rack0"))
    return graph


class VirtualCluster:
    """The cluster around the actors during a replay (module docstring)."""

    def __init__(
        self,
        model_dir: str,
        candidates: list[Candidate],
        allocator: Allocator,
        *,
        max_num_seqs: int = 16,
        deploy_s: float = 10.0,
        refactor_s: float = 3.0,
    ) -> None:
        self.model_dir = model_dir
        self.speed = {c.num_stages: c for c in candidates}
        self.allocator = allocator
        self.max_num_seqs, self.deploy_s, self.refactor_s = max_num_seqs, deploy_s, refactor_s
        self.spec = ModelSpec.from_dir(Path(model_dir))
        self.names = unit_names(self.spec.num_layers)
        self.replicas: dict[str, VirtualReplica] = {}
        self.pending_replies: list[tuple[float, str, ev.Event]] = []
        self.arrivals: list[ev.Arrival] = []
        self.completions: list[ev.Completion] = []
        self.round_robin = 0

    # ---- what the policy asks for -----------------------------------------------------------

    def deploy(self, request: ev.DeployPipeline, now: float) -> list[tuple[str, ev.Event]]:
        workers = self._place(request.pipeline_id, request.num_stages)
        if not workers:
            reply = ev.ErrorReply(
                sender="coordinator", reply_to=request.cmd_id, code="deploy_refused", message="no room"
            )
            return [("policy", reply)]
        layout = self._layout(request.num_stages)
        self.replicas[request.pipeline_id] = VirtualReplica(
            request.pipeline_id, request.num_stages, layout, workers, now + self.deploy_s
        )
        accepted = ev.DeployAccepted(sender="coordinator", reply_to=request.cmd_id, pipeline_id=request.pipeline_id)
        return [("policy", accepted), ("monitor", self._view(self.replicas[request.pipeline_id], now))]

    def refactor(self, request: ev.RefactorPipeline, now: float) -> list[tuple[str, ev.Event]]:
        replica = self.replicas.get(request.pipeline_id)
        stages = len(request.layout) if request.layout else request.num_stages
        workers = self._place(request.pipeline_id, stages) if replica is not None else []
        if not workers:
            outcome = ev.RefactorOutcome(
                sender="refactor",
                reply_to=request.cmd_id,
                pipeline_id=request.pipeline_id,
                refactor_id=0,
                epoch=replica.epoch if replica else 0,
                outcome="refused",
                reason="no room",
            )
            return [("policy", outcome)]
        replica.num_stages, replica.workers, replica.epoch = stages, workers, replica.epoch + 1
        replica.layout = list(request.layout) if request.layout else self._layout(stages)
        outcome = ev.RefactorOutcome(
            sender="refactor",
            reply_to=request.cmd_id,
            pipeline_id=request.pipeline_id,
            refactor_id=replica.epoch,
            epoch=replica.epoch,
            outcome="committed",
            workers=workers,
        )
        self.pending_replies.append((now + self.refactor_s, "policy", outcome))
        return [("monitor", self._view(replica, now))]

    def drain(self, request: ev.DrainPipeline, now: float) -> list[tuple[str, ev.Event]]:
        replica = self.replicas.get(request.pipeline_id)
        if replica is not None:
            replica.draining = True
        return [("policy", ev.Ack(sender=HOST, reply_to=request.cmd_id))]

    def undeploy(self, request: ev.UndeployPipeline, now: float) -> list[tuple[str, ev.Event]]:
        replica = self.replicas.pop(request.pipeline_id, None)
        self.allocator.handle(ev.ReleasePlacement(pipeline_id=request.pipeline_id), now)
        removed = []
        if replica is not None:
            removed = [("monitor", ev.PipelineUpdated(pipeline=self._view(replica, now).pipeline, removed=True))]
        return [("policy", ev.Ack(sender="coordinator", reply_to=request.cmd_id)), *removed]

    def _place(self, pipeline_id: str, num_stages: int) -> list[str]:
        memory = list(stage_memory_of(self.model_dir, num_stages))
        place = ev.PlaceStages(
            sender="coordinator", cmd_id=0, pipeline_id=pipeline_id, stage_memory=memory, model=self.model_dir
        )
        decided = [a.event for a in self.allocator.handle(place, 0.0) if isinstance(a, Send)]
        return list(decided[0].devices) if decided else []

    def _layout(self, num_stages: int) -> list[str]:
        return partition_model(self.spec, num_stages, CONTEXT_TOKENS).describe(self.names)

    def _view(self, replica: VirtualReplica, now: float) -> ev.PipelineUpdated:
        layout = Layout.from_spec(replica.layout, self.names)
        stages = [
            ev.StageView(stage=k, worker_id=w, units=layout.stage_units(k, self.names))
            for k, w in enumerate(replica.workers)
        ]
        state = "READY" if now >= replica.ready_at else "LOADING"
        view = ev.PipelineView(
            pipeline_id=replica.pipeline_id,
            state=state,
            epoch=replica.epoch,
            model_dir=self.model_dir,
            engine_host=HOST,
            stages=stages,
        )
        return ev.PipelineUpdated(sender="coordinator", pipeline=view)

    # ---- serving ------------------------------------------------------------------------------

    def admit(self, request: TracedRequest, now: float) -> None:
        self.arrivals.append(
            ev.Arrival(age_s=max(0.0, now - request.at), model_dir=self.model_dir, prompt_tokens=request.prompt_tokens)
        )
        serving = [r for r in self.replicas.values() if now >= r.ready_at and not r.draining]
        if not serving:
            serving = list(self.replicas.values())
        if not serving:
            return
        chosen = min(serving, key=lambda r: (len(r.running) + len(r.waiting)) / self.max_num_seqs)
        chosen.waiting.append(ServedRequest(request.at, max(1, request.output_tokens)))

    def serve(self, now: float, dt: float) -> list[tuple[str, ev.Event]]:
        events: list[tuple[str, ev.Event]] = []
        for replica in self.replicas.values():
            if now < replica.ready_at:
                continue
            speed = self.speed.get(replica.num_stages)
            while replica.waiting and len(replica.running) < self.max_num_seqs:
                request = replica.waiting.pop(0)
                request.started = now
                replica.running.append(request)
            if replica.running and speed is not None:
                share = speed.throughput * dt / len(replica.running)
                for request in list(replica.running):
                    if request.first_token is None:
                        request.first_token = now + speed.latency_s
                    request.produced += share
                    if request.produced >= request.output_tokens:
                        replica.running.remove(request)
                        tpot = (now - request.first_token) / max(1, request.output_tokens - 1)
                        self.completions.append(
                            ev.Completion(
                                model_dir=self.model_dir,
                                output_tokens=request.output_tokens,
                                ttft_s=request.first_token - request.arrival,
                                tpot_s=max(speed.latency_s, tpot),
                            )
                        )
            events.append(("monitor", self._view(replica, now)))
            events.append(("monitor", self._engine_metrics(replica)))
        due = [r for r in self.pending_replies if r[0] <= now]
        self.pending_replies = [r for r in self.pending_replies if r[0] > now]
        events += [(peer, event) for _, peer, event in due]
        return events

    def _engine_metrics(self, replica: VirtualReplica) -> ev.EngineMetrics:
        return ev.EngineMetrics(
            sender=HOST,
            host_id=HOST,
            pipeline_id=replica.pipeline_id,
            epoch=replica.epoch,
            running=len(replica.running),
            waiting=len(replica.waiting),
            kv_blocks_used=0,
            kv_blocks_free=0,
            tokens_per_s=0.0,
        )

    def traffic_report(self) -> ev.TrafficReport:
        report = ev.TrafficReport(sender=HOST, host_id=HOST, arrivals=self.arrivals, completions=self.completions)
        self.arrivals, self.completions = [], []
        return report
