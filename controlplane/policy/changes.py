"""The changes the policy issues (deploy, refactor, drain, undeploy) and how each is followed to its end.

One change per model at a time (``ModelState.in_flight``). A refactor ends with its ``RefactorOutcome``; a
new replica once a snapshot shows it READY (or FAILED, then it is undeployed); a scale-in drains the replica,
waits for two snapshots with nothing running on it, undeploys it and ends with the undeploy's Ack.
"""

from __future__ import annotations

import itertools

from common import events as ev
from controlplane.actor import Action, Send, Tell
from controlplane.policy.explain import decided, ended
from controlplane.policy.state import InFlight, ModelState

IN_FLIGHT_LIMIT_S = 600.0  # a change unanswered this long is given up (its own phases time out well before)
IDLE_SNAPSHOTS_BEFORE_UNDEPLOY = 2  # a drained replica must show nothing running twice (requests admitted late)
OUTCOMES = {"committed": "committed", "aborted": "failed", "refused": "refused", "planned": "committed"}


class Changes:
    """Issues commands with ids of their own and matches the answers. Invariant: an answer counts only when
    it comes from the peer the command went to, for the change in flight of its model."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[str, str]] = {}  # cmd_id -> (model_dir, the peer that answers it)
        self._cmd_ids = itertools.count(1)

    def _issue(self, state: ModelState, peer: str) -> int:
        cmd_id = next(self._cmd_ids)
        self.pending[cmd_id] = (state.model_dir, peer)
        return cmd_id

    # ---- issuing ----------------------------------------------------------------------------------

    def deploy(self, state: ModelState, decision, pipeline_id: str, num_stages: int, template: str, now: float):
        cmd_id = self._issue(state, "coordinator")
        state.in_flight = InFlight(decision, cmd_id, pipeline_id, now)
        request = ev.DeployPipeline(
            sender="policy",
            cmd_id=cmd_id,
            pipeline_id=pipeline_id,
            model_dir=state.model_dir,
            num_stages=num_stages,
            replica_of=template,
        )
        return [Tell("coordinator", request), decided(decision)]

    def refactor(self, state: ModelState, decision, pipeline_id: str, now: float, **target) -> list[Action]:
        cmd_id = self._issue(state, "refactor")
        state.in_flight = InFlight(decision, cmd_id, pipeline_id, now)
        request = ev.RefactorPipeline(sender="policy", cmd_id=cmd_id, pipeline_id=pipeline_id, by="policy", **target)
        return [Tell("refactor", request), decided(decision)]

    def drain(self, state: ModelState, decision, victim: ev.PipelineLoad, last: bool, now: float) -> list[Action]:
        cmd_id = self._issue(state, victim.engine_host)
        state.in_flight = InFlight(decision, cmd_id, victim.pipeline_id, now)
        state.draining.add(victim.pipeline_id)
        request = ev.DrainPipeline(sender="policy", cmd_id=cmd_id, pipeline_id=victim.pipeline_id, last=last)
        return [Send(victim.engine_host, request), decided(decision)]

    # ---- following -----------------------------------------------------------------------------

    def on_reply(self, models: dict[str, ModelState], reply: ev.Reply, now: float) -> list[Action]:
        model_dir, peer = self.pending.get(reply.reply_to, ("", ""))
        if reply.sender != peer:  # another actor's command with the same id, answered on the bus
            return []
        del self.pending[reply.reply_to]
        state = models.get(model_dir)
        if state is None or state.in_flight is None or state.in_flight.cmd_id != reply.reply_to:
            return []  # a clean-up command (the undeploy of a replica that failed to deploy)
        flight = state.in_flight
        if isinstance(reply, ev.RefactorOutcome):
            return self.finish(state, OUTCOMES.get(reply.outcome, "failed"), reply.reason, now)
        if isinstance(reply, ev.ErrorReply):
            return self.finish(state, "refused", reply.message, now)
        flight.cmd_id = 0  # DeployAccepted, or the Ack of a drain or an undeploy: the cluster's state tells the rest
        return self.finish(state, "removed", "", now) if flight.undeploying else []

    def follow(self, state: ModelState, now: float) -> list[Action]:
        """Advance the change in flight from the cluster's state in the latest snapshot."""
        flight = state.in_flight
        if flight is None:
            return []
        if now - flight.started > IN_FLIGHT_LIMIT_S:
            return self.finish(state, "failed", f"no outcome in {IN_FLIGHT_LIMIT_S:.0f} s", now)
        if flight.cmd_id:
            return []
        pipeline = next((p for p in state.snapshot.pipelines if p.pipeline_id == flight.pipeline_id), None)
        if flight.decision.kind == "scale_out":
            if pipeline is not None and pipeline.state == "READY":
                flight.decision.placement = list(pipeline.stage_workers)
                return self.finish(state, "ready", "", now)
            if pipeline is not None and pipeline.state == "FAILED":
                failed = self.finish(state, "failed", "the new replica failed to deploy", now)
                return failed + [self._undeploy(state, pipeline.pipeline_id)]
        elif flight.decision.kind == "scale_in" and not flight.undeploying:
            idle = pipeline is None or pipeline.running + pipeline.waiting == 0
            flight.idle_snapshots = flight.idle_snapshots + 1 if idle else 0
            if flight.idle_snapshots >= IDLE_SNAPSHOTS_BEFORE_UNDEPLOY:
                flight.undeploying = True
                undeploy = self._undeploy(state, flight.pipeline_id)
                flight.cmd_id = undeploy.event.cmd_id
                return [undeploy]
        return []

    def _undeploy(self, state: ModelState, pipeline_id: str) -> Tell:
        cmd_id = self._issue(state, "coordinator")
        return Tell("coordinator", ev.UndeployPipeline(sender="policy", cmd_id=cmd_id, pipeline_id=pipeline_id))

    def finish(self, state: ModelState, outcome: str, reason: str, now: float) -> list[Action]:
        """End the change in flight with ``outcome``; a refactor that did not commit puts the target back."""
        flight, state.in_flight = state.in_flight, None
        decision = flight.decision
        decision.outcome, decision.reason, decision.duration_s = outcome, reason, round(now - flight.started, 3)
        if decision.kind in ("granularity", "rebalance") and outcome != "committed":
            state.target_stages = decision.stages_from or state.target_stages
            state.last_change = now
        if decision.kind == "scale_in":
            state.draining.discard(flight.pipeline_id)
            state.scaled_to_zero = outcome == "removed" and decision.replicas_to == 0
        return [ended(decision)]
