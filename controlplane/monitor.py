"""The monitor actor: who is alive, what they report, and the cluster status operators read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from common import events as ev
from common.config import PolicyConfig
from controlplane.actor import Action, Log, Send, Tell, Tick
from controlplane.policy.traffic import TrafficAnalysis


@dataclass
class Member:
    """A registered worker, engine host or supervisor. ``state`` is ``alive`` or ``lost``."""

    member_id: str
    kind: str
    pid: int
    host: str
    last_seen: float
    state: str = "alive"
    device: ev.DeviceInfo | None = None
    request_address: str = ""
    http_address: str = ""
    spawn_capacity: int = 0
    stages: list[ev.StageMetrics] = field(default_factory=list)


class Monitor:
    """Registry of workers and engine hosts, heartbeat watchdog, metrics and status.

    Invariants: a member is ``lost`` once it has been silent for more than
    ``heartbeat_interval_s * lost_after_heartbeats``, and the coordinator, the allocator
    and the refactor executor are told exactly once per loss; a member that registers
    again with the same id replaces its old record (a restart with a new pid counts as a
    loss of the old one first); status answers reflect every event handled before the
    request.
    """

    name: ClassVar[str] = "monitor"
    accepts: ClassVar[tuple[type, ...]] = (
        ev.RegisterWorker,
        ev.RegisterEngineHost,
        ev.RegisterSupervisor,
        ev.Heartbeat,
        ev.WorkerMetrics,
        ev.EngineMetrics,
        ev.StatusRequest,
        ev.PipelineUpdated,
        ev.MessageRejected,
        ev.MemberExited,
        ev.TrafficReport,
        ev.PolicyViewUpdated,
        Tick,
    )

    def __init__(
        self, heartbeat_interval_s: float = 1.0, lost_after_heartbeats: int = 3, policy: PolicyConfig | None = None
    ) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.lost_after_s = heartbeat_interval_s * lost_after_heartbeats
        self.members: dict[str, Member] = {}
        self.pipelines: dict[str, ev.PipelineView] = {}
        self.engine_metrics: dict[str, ev.EngineMetrics] = {}
        self.rejected_messages = 0
        policy = policy or PolicyConfig()
        self.snapshot_interval_s = policy.interval_s
        self.next_snapshot = float("-inf")
        self.traffic = TrafficAnalysis(policy.window_s, policy.congestion_intervals, policy.congestion_min_queue)
        self.policy_view: ev.PolicyView | None = None
        self.handlers = {
            ev.RegisterWorker: self._on_register_worker,
            ev.RegisterEngineHost: self._on_register_engine_host,
            ev.RegisterSupervisor: self._on_register_supervisor,
            ev.Heartbeat: self._on_heartbeat,
            ev.WorkerMetrics: self._on_worker_metrics,
            ev.EngineMetrics: self._on_engine_metrics,
            ev.StatusRequest: self._on_status_request,
            ev.PipelineUpdated: self._on_pipeline_updated,
            ev.MessageRejected: self._on_message_rejected,
            ev.MemberExited: self._on_member_exited,
            ev.TrafficReport: self._on_traffic_report,
            ev.PolicyViewUpdated: self._on_policy_view,
            Tick: self._on_tick,
        }

    def handle(self, event, now: float) -> list[Action]:
        return self.handlers[type(event)](event, now)

    # ---- what other actors read (they run on the same thread) -------------------------------

    def alive_workers(self) -> list[str]:
        return [m.member_id for m in self.members.values() if m.kind == "worker" and m.state == "alive"]

    def free_memory(self, worker_id: str) -> int | None:
        member = self.members.get(worker_id)
        return member.device.memory_free if member is not None and member.device is not None else None

    def spawner(self) -> tuple[str, int] | None:
        """The alive supervisor that can start the most workers, and how many; None if there is none."""
        supervisors = [m for m in self.members.values() if m.kind == "supervisor" and m.state == "alive"]
        best = max(supervisors, key=lambda m: m.spawn_capacity, default=None)
        return (best.member_id, best.spawn_capacity) if best is not None else None

    def stages_served(self, worker_id: str) -> int:
        """Stages of any pipeline the worker serves, as the coordinator's pipelines say (not its late metrics)."""
        return sum(1 for p in self.pipelines.values() for s in p.stages if s.worker_id == worker_id)

    def engine_load(self, pipeline_id: str) -> tuple[int, float]:
        """(positions with KV written, seconds per micro-batch) the pipeline's engine last reported; zeros if none."""
        metrics = self.engine_metrics.get(pipeline_id)
        return (metrics.kv_tokens, metrics.step_s) if metrics is not None else (0, 0.0)

    # ---- events ------------------------------------------------------------------------------

    def _on_register_worker(self, event: ev.RegisterWorker, now: float) -> list[Action]:
        actions = self._replace_member(event.worker_id, event.pid, now)
        self.members[event.worker_id] = Member(
            event.worker_id, "worker", event.pid, event.host, now, device=event.device
        )
        actions += [
            Tell("allocator", event),
            Tell("coordinator", event),
            Tell("refactor_executor", event),
            Send(
                event.sender,
                ev.WorkerRegistered(
                    sender=self.name, reply_to=event.cmd_id, heartbeat_interval_s=self.heartbeat_interval_s
                ),
            ),
            Log(
                "worker.registered",
                {
                    "worker_id": event.worker_id,
                    "worker_pid": event.pid,
                    "host": event.host,
                    "device": event.device.device_id,
                    "memory_total": event.device.memory_total,
                },
            ),
        ]
        return actions

    def _on_register_engine_host(self, event: ev.RegisterEngineHost, now: float) -> list[Action]:
        actions = self._replace_member(event.host_id, event.pid, now)
        self.members[event.host_id] = Member(
            event.host_id,
            "engine_host",
            event.pid,
            event.host,
            now,
            request_address=event.request_address,
            http_address=event.http_address,
        )
        return actions + [
            Tell("coordinator", event),
            Send(event.sender, ev.Ack(sender=self.name, reply_to=event.cmd_id)),
            Log(
                "engine_host.registered",
                {
                    "host_id": event.host_id,
                    "host_pid": event.pid,
                    "request_address": event.request_address,
                    "http_address": event.http_address,
                },
            ),
        ]

    def _replace_member(self, member_id: str, pid: int, now: float) -> list[Action]:
        old = self.members.get(member_id)
        if old is None:
            return []
        actions: list[Action] = [
            Log("worker.reregistered", {"worker_id": member_id, "old_pid": old.pid, "new_pid": pid})
        ]
        if old.state == "alive" and old.pid != pid:
            actions += self._declare_lost(old, now)
        return actions

    def _on_register_supervisor(self, event: ev.RegisterSupervisor, now: float) -> list[Action]:
        actions = self._replace_member(event.supervisor_id, event.pid, now)
        self.members[event.supervisor_id] = Member(
            event.supervisor_id, "supervisor", event.pid, event.host, now, spawn_capacity=event.spawn_capacity
        )
        return actions + [Send(event.sender, ev.Ack(sender=self.name, reply_to=event.cmd_id))]

    def _on_member_exited(self, event: ev.MemberExited, now: float) -> list[Action]:
        """A supervisor saw the process exit: lost at once, without waiting for missed heartbeats."""
        member = self.members.get(event.member_id)
        if member is None:  # it exited before it registered: nobody else knows it, but a refactor may wait for it
            member = Member(event.member_id, "unregistered", event.pid, "", now)
        if member.pid != event.pid or member.state != "alive":
            return []  # an older process of a member that registered again since, or one already lost
        return self._declare_lost(member, now, f"exited with code {event.exit_code}")

    def _on_heartbeat(self, event: ev.Heartbeat, now: float) -> list[Action]:
        member = self.members.get(event.worker_id)
        if member is None or member.state == "lost":
            return [
                Send(
                    event.sender,
                    ev.ErrorReply(
                        sender=self.name,
                        reply_to=-1,
                        code="not_registered",
                        message=f"{event.worker_id} is not registered; register again",
                    ),
                )
            ]
        member.last_seen = now
        return []

    def _on_worker_metrics(self, event: ev.WorkerMetrics, now: float) -> list[Action]:
        member = self.members.get(event.worker_id)
        if member is not None and member.state == "alive":
            member.last_seen = now
            member.stages = list(event.stages)
        return []

    def _on_engine_metrics(self, event: ev.EngineMetrics, now: float) -> list[Action]:
        self.engine_metrics[event.pipeline_id] = event
        member = self.members.get(event.host_id)
        if member is not None and member.state == "alive":
            member.last_seen = now
        return []

    def _on_pipeline_updated(self, event: ev.PipelineUpdated, now: float) -> list[Action]:
        if event.removed:
            self.pipelines.pop(event.pipeline.pipeline_id, None)
            self.engine_metrics.pop(event.pipeline.pipeline_id, None)
        else:
            self.pipelines[event.pipeline.pipeline_id] = event.pipeline
        return []

    def _on_message_rejected(self, event: ev.MessageRejected, now: float) -> list[Action]:
        self.rejected_messages += 1
        return []

    def _on_traffic_report(self, event: ev.TrafficReport, now: float) -> list[Action]:
        self.traffic.report(event, now)
        return []

    def _on_policy_view(self, event: ev.PolicyViewUpdated, now: float) -> list[Action]:
        self.policy_view = event.view
        return []

    def _on_tick(self, event: Tick, now: float) -> list[Action]:
        actions: list[Action] = []
        for member in self.members.values():
            if member.state == "alive" and now - member.last_seen > self.lost_after_s:
                actions += self._declare_lost(member, now)
        if now >= self.next_snapshot:
            self.next_snapshot = now + self.snapshot_interval_s
            actions += self.traffic_snapshots(now)
        return actions

    def traffic_snapshots(self, now: float) -> list[Action]:
        """Each model's request-pattern analysis for the policy, and a log line per congested stage."""
        by_model: dict[str, list[ev.PipelineLoad]] = {}
        for pipeline in self.pipelines.values():
            by_model.setdefault(pipeline.model_dir, []).append(self._load(pipeline))
        actions: list[Action] = []
        for snapshot in self.traffic.snapshots(now, by_model):
            actions.append(Tell("policy", snapshot))
            actions += [
                Log("monitor.congestion", {"pipeline_id": c.pipeline_id, "stage": c.stage, "queue": c.queue_lengths})
                for c in snapshot.congested
            ]
        return actions

    def _load(self, pipeline: ev.PipelineView) -> ev.PipelineLoad:
        view = self._with_metrics(pipeline)
        engine = self.engine_metrics.get(pipeline.pipeline_id)
        blocks = (engine.kv_blocks_used + engine.kv_blocks_free) if engine else 0
        return ev.PipelineLoad(
            pipeline_id=pipeline.pipeline_id,
            state=pipeline.state,
            epoch=pipeline.epoch,
            stage_units=[s.units for s in view.stages],
            stage_queues=[s.queue_length for s in view.stages],
            stage_busy=[s.busy_fraction for s in view.stages],
            stage_workers=[s.worker_id for s in view.stages],
            running=engine.running if engine else 0,
            waiting=engine.waiting if engine else 0,
            kv_used_fraction=engine.kv_blocks_used / blocks if blocks else 0.0,
            engine_host=pipeline.engine_host,
        )

    def _declare_lost(self, member: Member, now: float, reason: str = "") -> list[Action]:
        member.state = "lost"
        lost = ev.WorkerLost(
            sender=self.name, worker_id=member.member_id, silent_for_s=round(now - member.last_seen, 3), reason=reason
        )
        return [
            Tell("coordinator", lost),
            Tell("allocator", lost),
            Tell("refactor_executor", lost),
            Log(
                "worker.lost",
                {
                    "worker_id": member.member_id,
                    "kind": member.kind,
                    "member_pid": member.pid,
                    "silent_for_s": lost.silent_for_s,
                }
                | ({"reason": reason} if reason else {}),
                level="warning",
            ),
        ]

    def _on_status_request(self, event: ev.StatusRequest, now: float) -> list[Action]:
        return [Send(event.sender, self.status(event.cmd_id, now))]

    def status(self, reply_to: int, now: float) -> ev.StatusReply:
        workers = [
            ev.WorkerView(
                worker_id=m.member_id,
                state=m.state,
                host=m.host,
                pid=m.pid,
                device=m.device,
                last_heartbeat_age_s=round(now - m.last_seen, 3),
                stages=m.stages,
            )
            for m in self.members.values()
            if m.kind == "worker"
        ]
        hosts = [
            ev.EngineHostView(
                host_id=m.member_id,
                state=m.state,
                pid=m.pid,
                request_address=m.request_address,
                http_address=m.http_address,
            )
            for m in self.members.values()
            if m.kind == "engine_host"
        ]
        return ev.StatusReply(
            sender=self.name,
            reply_to=reply_to,
            workers=workers,
            engine_hosts=hosts,
            pipelines=[self._with_metrics(p) for p in self.pipelines.values()],
            rejected_messages=self.rejected_messages,
            policy=self.policy_view,
        )

    def _with_metrics(self, pipeline: ev.PipelineView) -> ev.PipelineView:
        engine = self.engine_metrics.get(pipeline.pipeline_id)
        stages = []
        for stage in pipeline.stages:
            member = self.members.get(stage.worker_id)
            reported = next(
                (s for s in (member.stages if member else []) if s.pipeline_id == pipeline.pipeline_id), None
            )
            stages.append(
                ev.StageView(
                    stage=stage.stage,
                    worker_id=stage.worker_id,
                    units=stage.units,
                    queue_length=reported.queue_length if reported else 0,
                    busy_fraction=reported.busy_fraction if reported else 0.0,
                    kv_blocks_used=engine.kv_blocks_used if engine else 0,
                    kv_blocks_free=engine.kv_blocks_free if engine else 0,
                )
            )
        return ev.PipelineView(
            pipeline_id=pipeline.pipeline_id,
            state=pipeline.state,
            epoch=pipeline.epoch,
            model_dir=pipeline.model_dir,
            engine_host=pipeline.engine_host,
            stages=stages,
            reason=pipeline.reason,
        )
