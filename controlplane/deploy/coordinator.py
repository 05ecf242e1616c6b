"""The coordinator actor: deploys and undeploys pipelines, one state machine per pipeline.

Deploy: PLACING (allocator) -> PREPARING (engine host binds its inbox) -> LOADING (every
worker loads its units and binds its inbox) -> CONNECTING (each stage learns its
successor and the engine) -> STARTING (the engine starts feeding stage 0) -> READY.
A refusal, an error reply or a phase timeout ends in FAILED with the reason, and
everything already set up is torn down. A lost worker turns READY into DEGRADED.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar

import msgspec

from common import events as ev
from common.errors import FlexPipeError
from controlplane.actor import Action, Log, Send, Tell, Tick
from controlplane.deploy.plan import PipelinePlan

PHASES = ("PLACING", "PREPARING", "LOADING", "CONNECTING", "STARTING")
MAX_RETIRED = 64  # undeployed pipelines remembered as templates for replicas (a model scaled to zero and back)


@dataclass
class Pipeline:
    """One pipeline's desired and observed state. ``pending`` maps outstanding command ids to the peer asked."""

    request: ev.DeployPipeline
    plan: PipelinePlan
    engine_host: str
    state: str = "PLACING"
    epoch: int = 0
    reason: str = ""
    deadline: float = 0.0
    workers: list[str] = field(default_factory=list)
    stage_inboxes: dict[int, str] = field(default_factory=dict)
    engine_inbox: str = ""
    pending: dict[int, str] = field(default_factory=dict)
    former_workers: set[str] = field(default_factory=set)
    loaded: dict[int, ev.StageLoaded] = field(default_factory=dict)

    @property
    def pipeline_id(self) -> str:
        return self.request.pipeline_id

    def view(self) -> ev.PipelineView:
        stages = [
            ev.StageView(stage=k, worker_id=self.workers[k] if k < len(self.workers) else "", units=units)
            for k, units in enumerate(self.plan.stage_units)
        ]
        return ev.PipelineView(
            pipeline_id=self.pipeline_id,
            state=self.state,
            epoch=self.epoch,
            model_dir=self.request.model_dir,
            engine_host=self.engine_host,
            stages=stages,
            reason=self.reason,
        )


class DeployCoordinator:
    """Drives pipelines through deploy and undeploy.

    Invariants: at most one pipeline per id; a pipeline only advances when every
    command of its current phase has been answered (replies are matched by ``cmd_id``,
    stale or unknown replies are ignored); every phase ends within ``phase_timeout_s``;
    a pipeline that fails or is undeployed releases its placement, unloads its stages
    and stops its engine; every state change is published to the monitor.
    """

    name: ClassVar[str] = "coordinator"
    accepts: ClassVar[tuple[type, ...]] = (
        ev.DeployPipeline,
        ev.UndeployPipeline,
        ev.PlacementDecided,
        ev.EnginePrepared,
        ev.StageLoaded,
        ev.Ack,
        ev.ErrorReply,
        ev.WorkerLost,
        ev.RegisterWorker,
        ev.RegisterEngineHost,
        ev.PipelineReshaped,
        Tick,
    )

    def __init__(self, planner: Callable[[ev.DeployPipeline], PipelinePlan], phase_timeout_s: float = 120.0) -> None:
        self.planner = planner
        self.phase_timeout_s = phase_timeout_s
        self.pipelines: dict[str, Pipeline] = {}
        self.engine_hosts: list[str] = []
        self.lost: set[str] = set()
        self.retired: dict[str, ev.DeployPipeline] = {}  # undeployed pipelines' requests, for replicas of them
        self._cmd_ids = itertools.count(1)
        self._owner: dict[int, str] = {}
        self.handlers = {
            ev.DeployPipeline: self._on_deploy,
            ev.UndeployPipeline: self._on_undeploy,
            ev.PlacementDecided: self._on_placement_decided,
            ev.EnginePrepared: self._on_engine_prepared,
            ev.StageLoaded: self._on_stage_loaded,
            ev.Ack: self._on_ack,
            ev.ErrorReply: self._on_error_reply,
            ev.WorkerLost: self._on_worker_lost,
            ev.RegisterWorker: self._on_register_worker,
            ev.RegisterEngineHost: self._on_register_engine_host,
            ev.PipelineReshaped: self._on_pipeline_reshaped,
            Tick: self._on_tick,
        }

    def handle(self, event, now: float) -> list[Action]:
        return self.handlers[type(event)](event, now)

    # ---- operator commands -----------------------------------------------------------

    def _on_deploy(self, event: ev.DeployPipeline, now: float) -> list[Action]:
        refuse = lambda reason: [
            Send(
                event.sender,
                ev.ErrorReply(
                    sender=self.name,
                    reply_to=event.cmd_id,  # noqa: E731
                    code="deploy_refused",
                    message=reason,
                ),
            ),
            Log(
                "pipeline.state",
                {"pipeline_id": event.pipeline_id, "state": "REFUSED", "reason": reason},
                level="warning",
            ),
        ]
        if event.pipeline_id in self.pipelines:
            return refuse(f"pipeline {event.pipeline_id!r} already exists")
        if event.replica_of:
            original = self.pipelines.get(event.replica_of)
            template = original.request if original is not None else self.retired.get(event.replica_of)
            if template is None:
                return refuse(f"no pipeline {event.replica_of!r} to make a replica of")
            event = msgspec.structs.replace(
                template,
                sender=event.sender,
                cmd_id=event.cmd_id,
                pipeline_id=event.pipeline_id,
                num_stages=event.num_stages,
                layout=list(event.layout),
                workers=[],
                replica_of=event.replica_of,
            )
        hosts = [h for h in self.engine_hosts if h not in self.lost]
        if not hosts:
            return refuse("no engine host is registered")
        if event.num_stages < 1 and not event.layout:
            return refuse("give a stage count >= 1 or an explicit layout")
        try:
            plan = self.planner(event)
        except FlexPipeError as exc:
            return refuse(str(exc))
        if event.workers and len(event.workers) != len(plan.stage_units):
            return refuse(f"{len(event.workers)} workers named for {len(plan.stage_units)} stages")
        pipeline = Pipeline(event, plan, hosts[0])
        self.pipelines[event.pipeline_id] = pipeline
        place = ev.PlaceStages(
            sender=self.name,
            cmd_id=self._command(pipeline, "allocator"),
            pipeline_id=event.pipeline_id,
            stage_memory=plan.stage_memory,
            workers=list(event.workers),
            model=event.model_dir,
        )
        return [
            Send(
                event.sender, ev.DeployAccepted(sender=self.name, reply_to=event.cmd_id, pipeline_id=event.pipeline_id)
            ),
            Log(
                "pipeline.deploy_requested",
                {
                    "pipeline_id": event.pipeline_id,
                    "model_dir": event.model_dir,
                    "stages": len(plan.stage_units),
                    "stage_memory": plan.stage_memory,
                },
            ),
            Tell("allocator", place),
            *self._enter(pipeline, "PLACING", now),
        ]

    def _on_undeploy(self, event: ev.UndeployPipeline, now: float) -> list[Action]:
        pipeline = self.pipelines.pop(event.pipeline_id, None)
        if pipeline is not None:
            self.retired[event.pipeline_id] = pipeline.request
            for oldest in list(self.retired)[:-MAX_RETIRED]:
                del self.retired[oldest]
        if pipeline is None:
            return [
                Send(
                    event.sender,
                    ev.ErrorReply(
                        sender=self.name,
                        reply_to=event.cmd_id,
                        code="unknown_pipeline",
                        message=f"no pipeline {event.pipeline_id!r}",
                    ),
                )
            ]
        return [
            *self._teardown(pipeline),
            Send(event.sender, ev.Ack(sender=self.name, reply_to=event.cmd_id)),
            Tell("monitor", ev.PipelineUpdated(sender=self.name, pipeline=pipeline.view(), removed=True)),
            Log("pipeline.undeployed", {"pipeline_id": pipeline.pipeline_id, "epoch": pipeline.epoch}),
        ]

    # ---- replies -----------------------------------------------------------------------

    def _on_placement_decided(self, event: ev.PlacementDecided, now: float) -> list[Action]:
        pipeline = self._answered(event, "PLACING")
        if pipeline is None:
            return []
        if not event.devices:
            return self._fail(pipeline, f"placement refused: {event.reason}", now)
        pipeline.workers = list(event.devices)
        request, plan = pipeline.request, pipeline.plan
        prepare = ev.PrepareEngine(
            sender=self.name,
            cmd_id=self._command(pipeline, pipeline.engine_host),
            pipeline_id=pipeline.pipeline_id,
            epoch=pipeline.epoch,
            model_dir=request.model_dir,
            num_stages=len(plan.stage_units),
            num_kv_blocks=plan.num_kv_blocks,
            block_size=request.block_size,
            max_num_seqs=request.max_num_seqs,
            transport=request.transport,
            max_model_len=plan.max_model_len,
            max_num_batched_tokens=plan.max_num_batched_tokens,
            step_timeout_s=request.step_timeout_s,
        )
        return [Send(pipeline.engine_host, prepare), *self._enter(pipeline, "PREPARING", now)]

    def _on_engine_prepared(self, event: ev.EnginePrepared, now: float) -> list[Action]:
        pipeline = self._answered(event, "PREPARING")
        if pipeline is None:
            return []
        pipeline.engine_inbox = event.inbox_address
        request, plan = pipeline.request, pipeline.plan
        actions: list[Action] = []
        for stage, (worker, units) in enumerate(zip(pipeline.workers, plan.stage_units)):
            load = ev.LoadStage(
                sender=self.name,
                cmd_id=self._command(pipeline, worker),
                pipeline_id=pipeline.pipeline_id,
                epoch=pipeline.epoch,
                stage=stage,
                num_stages=len(plan.stage_units),
                model_dir=request.model_dir,
                units=units,
                num_kv_blocks=plan.num_kv_blocks,
                block_size=request.block_size,
                dtype=request.dtype,
                transport=request.transport,
            )
            actions.append(Send(worker, load))
        return actions + self._enter(pipeline, "LOADING", now)

    def _on_stage_loaded(self, event: ev.StageLoaded, now: float) -> list[Action]:
        pipeline = self._answered(event, "LOADING")
        if pipeline is None:
            return []
        pipeline.stage_inboxes[event.stage] = event.inbox_address
        pipeline.loaded[event.stage] = event
        actions: list[Action] = [
            Log(
                "stage.loaded",
                {
                    "pipeline_id": pipeline.pipeline_id,
                    "epoch": pipeline.epoch,
                    "stage": event.stage,
                    "param_bytes": event.param_bytes,
                    "kv_bytes": event.kv_bytes,
                    "seconds": round(event.load_seconds, 3),
                },
            )
        ]
        if pipeline.pending:
            return actions
        for stage, worker in enumerate(pipeline.workers):
            connect = ev.ConnectStage(
                sender=self.name,
                cmd_id=self._command(pipeline, worker),
                pipeline_id=pipeline.pipeline_id,
                epoch=pipeline.epoch,
                next_address=pipeline.stage_inboxes.get(stage + 1, ""),
                engine_address=pipeline.engine_inbox,
                slot_bytes=pipeline.plan.slot_bytes,
            )
            actions.append(Send(worker, connect))
        return actions + self._enter(pipeline, "CONNECTING", now)

    def _on_ack(self, event: ev.Ack, now: float) -> list[Action]:
        pipeline = self._answered(event, "CONNECTING", "STARTING")
        if pipeline is None or pipeline.pending:
            return []
        if pipeline.state == "CONNECTING":
            start = ev.StartEngine(
                sender=self.name,
                cmd_id=self._command(pipeline, pipeline.engine_host),
                pipeline_id=pipeline.pipeline_id,
                epoch=pipeline.epoch,
                first_stage_address=pipeline.stage_inboxes[0],
            )
            return [Send(pipeline.engine_host, start), *self._enter(pipeline, "STARTING", now)]
        return self._enter(pipeline, "READY", now)

    def _on_error_reply(self, event: ev.ErrorReply, now: float) -> list[Action]:
        pipeline = self._answered(event, *PHASES)
        if pipeline is None:
            return []
        return self._fail(pipeline, f"{event.sender} refused: {event.message}", now)

    def _on_pipeline_reshaped(self, event: ev.PipelineReshaped, now: float) -> list[Action]:
        """A refactor switched the pipeline to a new layout; undeploy will unload the former workers too."""
        pipeline = self.pipelines.get(event.pipeline_id)
        if pipeline is None or event.epoch <= pipeline.epoch:
            return []
        pipeline.former_workers |= set(pipeline.workers) - set(event.workers)
        pipeline.former_workers -= set(event.workers)
        pipeline.workers, pipeline.epoch = list(event.workers), event.epoch
        pipeline.plan = replace(
            pipeline.plan, stage_units=[list(u) for u in event.stage_units], stage_memory=list(event.stage_memory)
        )
        pipeline.stage_inboxes = dict(enumerate(event.stage_inboxes))
        return self._enter(pipeline, "READY", now)

    # ---- cluster changes and time --------------------------------------------------------

    def _on_register_worker(self, event: ev.RegisterWorker, now: float) -> list[Action]:
        self.lost.discard(event.worker_id)  # a restarted worker: a new process, usable again
        return []

    def _on_register_engine_host(self, event: ev.RegisterEngineHost, now: float) -> list[Action]:
        self.lost.discard(event.host_id)
        if event.host_id not in self.engine_hosts:
            self.engine_hosts.append(event.host_id)
        return []

    def _on_worker_lost(self, event: ev.WorkerLost, now: float) -> list[Action]:
        self.lost.add(event.worker_id)
        actions: list[Action] = []
        for pipeline in self.pipelines.values():
            involved = event.worker_id in pipeline.workers or event.worker_id == pipeline.engine_host
            if not involved:
                continue
            reason = f"{event.worker_id} lost ({event.reason or f'silent for {event.silent_for_s:.1f}s'})"
            if pipeline.state in PHASES:
                actions += self._fail(pipeline, reason, now)
            elif pipeline.state == "READY":
                pipeline.reason = reason
                actions += self._enter(pipeline, "DEGRADED", now)
                if pipeline.engine_host not in self.lost:
                    actions.append(
                        Send(
                            pipeline.engine_host,
                            ev.PipelineStateChanged(
                                sender=self.name,
                                pipeline_id=pipeline.pipeline_id,
                                epoch=pipeline.epoch,
                                state="DEGRADED",
                                reason=reason,
                            ),
                        )
                    )
        return actions

    def _on_tick(self, event: Tick, now: float) -> list[Action]:
        actions: list[Action] = []
        for pipeline in list(self.pipelines.values()):
            if pipeline.state in PHASES and now > pipeline.deadline:
                waiting = sorted(set(pipeline.pending.values()))
                actions += self._fail(
                    pipeline,
                    f"{pipeline.state} timed out after {self.phase_timeout_s:.0f}s waiting for {', '.join(waiting)}",
                    now,
                )
        return actions

    # ---- helpers ---------------------------------------------------------------------------

    def _command(self, pipeline: Pipeline, peer: str) -> int:
        cmd_id = next(self._cmd_ids)
        pipeline.pending[cmd_id] = peer
        self._owner[cmd_id] = pipeline.pipeline_id
        return cmd_id

    def _answered(self, reply: ev.Reply, *states: str) -> Pipeline | None:
        """The pipeline waiting for this reply in one of ``states``, with the command marked answered."""
        pipeline = self.pipelines.get(self._owner.pop(reply.reply_to, ""))
        if pipeline is None or reply.reply_to not in pipeline.pending or pipeline.state not in states:
            return None
        del pipeline.pending[reply.reply_to]
        return pipeline

    def _enter(self, pipeline: Pipeline, state: str, now: float) -> list[Action]:
        pipeline.state = state
        pipeline.deadline = now + self.phase_timeout_s
        fields = {"pipeline_id": pipeline.pipeline_id, "epoch": pipeline.epoch, "state": state}
        if pipeline.reason:
            fields["reason"] = pipeline.reason
        return [
            Tell("monitor", ev.PipelineUpdated(sender=self.name, pipeline=pipeline.view())),
            Log("pipeline.state", fields, level="warning" if state in ("FAILED", "DEGRADED") else "info"),
        ]

    def _fail(self, pipeline: Pipeline, reason: str, now: float) -> list[Action]:
        pipeline.reason = reason
        return [*self._teardown(pipeline), *self._enter(pipeline, "FAILED", now)]

    def _teardown(self, pipeline: Pipeline) -> list[Action]:
        for cmd_id in pipeline.pending:
            self._owner.pop(cmd_id, None)
        pipeline.pending.clear()
        actions: list[Action] = [
            Tell("allocator", ev.ReleasePlacement(sender=self.name, pipeline_id=pipeline.pipeline_id))
        ]
        for worker in [*pipeline.workers, *sorted(pipeline.former_workers)]:
            if worker not in self.lost:
                actions.append(
                    Send(
                        worker,
                        ev.UnloadStage(sender=self.name, cmd_id=next(self._cmd_ids), pipeline_id=pipeline.pipeline_id),
                    )
                )
        if pipeline.engine_host not in self.lost and pipeline.state != "PLACING":
            actions.append(
                Send(
                    pipeline.engine_host,
                    ev.StopEngine(sender=self.name, cmd_id=next(self._cmd_ids), pipeline_id=pipeline.pipeline_id),
                )
            )
        return actions
