"""The policy actor: granularity and replica count follow the traffic (FlexPipe Algorithm 1), every decision
explained. A pure state machine: ``TrafficSnapshot``\\s from the monitor and replies come in; refactor, deploy,
drain and undeploy requests, decision events and log lines go out.

Each snapshot of a model, in this order, at most one change per model at a time:

1. a change in progress is followed to its end (never interrupted by the next decision);
2. **scale out** when Eq. 5's replica count for the target granularity exceeds the replicas (or the TTFT/TPOT
   SLO is missed with requests waiting), within one interval;
3. **granularity**: Eq. 4's best candidate, raised to Eq. 11's stage count when queues fill, becomes the
   target once it beats the current target's score by ``hysteresis`` on ``confirm_intervals`` snapshots and
   ``cooldown_s`` has passed; then the replicas are split or merged to it one at a time;
4. **rebalance** a congested stage (its queue grew ``congestion_intervals`` times), outside the cooldown;
5. **scale in** one replica once Eq. 5 asked for fewer for ``scale_in_idle_s``: drain it, undeploy it when idle.

A change the cluster cannot place (``placeable`` says why) is not taken: recorded as ``held`` with the reason.
Issuing and following changes is ``controlplane.policy.changes``; recording them, ``controlplane.policy.explain``.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from pathlib import Path
from typing import Callable, ClassVar

from common import events as ev
from common.config import PolicyConfig
from controlplane.actor import Action, Log, Send, Tell
from controlplane.policy.candidates import Candidate
from controlplane.policy.changes import Changes
from controlplane.policy.explain import DecisionLog, Explain, held
from controlplane.policy.reading import Reading, read_snapshot
from controlplane.policy.rebalance import rebalanced_layout
from controlplane.policy.state import ModelState

CandidatesOf = Callable[[str, int, int], list[Candidate]]
Placeable = Callable[[str, int, str], str]


class Policy:
    """Decides, per model, the granularity and replica count (module docstring).

    Invariants: at most one change per model is in flight; a paused or ``static`` policy issues nothing; every
    issued change gets exactly one final outcome; decisions are numbered ``seq`` 1, 2, ... in the order taken.
    """

    name: ClassVar[str] = "policy"
    accepts: ClassVar[tuple[type, ...]] = (
        ev.TrafficSnapshot,
        ev.PolicyEventsRequest,
        ev.PolicyControl,
        ev.RefactorOutcome,
        ev.DeployAccepted,
        ev.ErrorReply,
        ev.Ack,
    )

    def __init__(
        self,
        config: PolicyConfig,
        candidates_of: CandidatesOf,
        placeable: Placeable = lambda model_dir, num_stages, pipeline_id: "",
    ) -> None:
        self.config = config
        self.candidates_of = candidates_of
        self.placeable = placeable
        self.paused = False
        self.models: dict[str, ModelState] = {}
        self.log = DecisionLog(config)
        self.changes = Changes()

    @property
    def decisions(self):
        return self.log.decisions

    def handle(self, event, now: float) -> list[Action]:
        if isinstance(event, ev.TrafficSnapshot):
            return self._on_snapshot(event, now)
        if isinstance(event, ev.PolicyEventsRequest):
            return [Send(event.sender, self._reply(event.cmd_id, self.log.after(event.after, event.limit), now))]
        if isinstance(event, ev.PolicyControl):
            return self._on_control(event, now)
        if isinstance(event, ev.Reply):
            return self.changes.on_reply(self.models, event, now)
        return []

    # ---- operators ---------------------------------------------------------------------------
    def _on_control(self, event: ev.PolicyControl, now: float) -> list[Action]:
        if event.action not in ("pause", "resume"):
            return [
                Send(
                    event.sender,
                    ev.ErrorReply(
                        sender=self.name,
                        reply_to=event.cmd_id,
                        code="bad_request",
                        message=f"policy action must be 'pause' or 'resume', not {event.action!r}",
                    ),
                )
            ]
        self.paused = event.action == "pause"
        return [
            Send(event.sender, self._reply(event.cmd_id, [], now)),
            Log("policy.paused" if self.paused else "policy.resumed", {"by": event.sender}),
            Tell("monitor", ev.PolicyViewUpdated(sender=self.name, view=self.view(now))),
        ]

    def _reply(self, cmd_id: int, decisions: list[ev.PolicyDecision], now: float) -> ev.PolicyEventsReply:
        return ev.PolicyEventsReply(sender=self.name, reply_to=cmd_id, decisions=decisions, view=self.view(now))

    def view(self, now: float) -> ev.PolicyView:
        models = []
        for state in self.models.values():
            snap = state.snapshot
            models.append(
                ev.ModelPolicyView(
                    model_dir=state.model_dir,
                    stages=sorted(len(p.stage_units) for p in state.replicas()),
                    replicas=len(state.replicas()),
                    target_stages=state.target_stages,
                    target_replicas=state.target_replicas,
                    arrival_rate=round(snap.arrival_rate, 3) if snap else 0.0,
                    cv=round(snap.cv, 3) if snap else 0.0,
                    trend=round(snap.trend, 4) if snap else 0.0,
                    cooldown_left_s=round(max(0.0, state.last_change + self.config.cooldown_s - now), 1),
                    in_flight=state.in_flight.decision.action if state.in_flight else "",
                    decisions_by_kind=dict(state.decisions_by_kind),
                )
            )
        mode = self.config.mode
        return ev.PolicyView(mode=mode, paused=self.paused, models=models, decisions=len(self.log.decisions), at=now)

    # ---- decisions -----------------------------------------------------------------------------

    def _on_snapshot(self, snap: ev.TrafficSnapshot, now: float) -> list[Action]:
        state = self._state(snap.model_dir)
        state.snapshot = snap
        state.draining &= {p.pipeline_id for p in snap.pipelines}
        state.last_replica = min((p.pipeline_id for p in snap.pipelines), default=state.last_replica)
        state.scaled_to_zero = state.scaled_to_zero and not snap.pipelines
        actions = self.changes.follow(state, now)
        if state.in_flight is None and not self.paused and self.config.mode == "flexpipe" and state.candidates:
            actions += self._decide(state, snap, now)
        return actions + [Tell("monitor", ev.PolicyViewUpdated(sender=self.name, view=self.view(now)))]

    def _state(self, model_dir: str) -> ModelState:
        if model_dir not in self.models:
            limits = self.config.limits(Path(model_dir).name)
            try:
                candidates = self.candidates_of(model_dir, limits.min_stages, limits.max_stages)
            except Exception:  # an unreadable checkpoint: the model is watched, never changed
                candidates = []
            self.models[model_dir] = ModelState(model_dir, candidates)
        return self.models[model_dir]

    def _decide(self, state: ModelState, snap: ev.TrafficSnapshot, now: float) -> list[Action]:
        serving = state.serving()
        if not serving:
            return self._from_zero(state, snap, now) if not state.replicas() else []
        if state.target_stages == 0:
            current = Counter(len(p.stage_units) for p in serving).most_common(1)[0][0]
            state.target_stages, state.proposal = current, current
        probe = serving[0].pipeline_id  # a K-stage layout must fit as if this replica were re-shaped
        reading = read_snapshot(
            state.candidates,
            state.target_stages,
            snap,
            serving,
            self.config,
            lambda k: not self.placeable(state.model_dir, k, probe),
        )
        limits = self.config.limits(Path(state.model_dir).name)
        needed = reading.needed if reading.rate_known else min(reading.needed, len(state.replicas()))
        if reading.slo_missed:
            needed = max(needed, len(state.replicas()) + 1)
        state.target_replicas = min(limits.max_replicas, max(limits.min_replicas, needed))
        explain = self.log.explainer(state, snap, reading.scores, reading.eq11, reading.placeable)
        return (
            self._scale_out(state, reading.why_replicas, now, explain)
            or self._scale_in(state, reading.why_replicas, now, explain)
            or self._granularity(state, reading, now, explain)
            or self._rebalance(state, snap, now, explain)
        )

    def _from_zero(self, state: ModelState, snap: ev.TrafficSnapshot, now: float) -> list[Action]:
        """A model the policy scaled to zero (its gateway counts refused requests as arrivals): a replica of
        its last one, at its last granularity, as soon as anything arrives."""
        if not state.scaled_to_zero or snap.arrivals == 0:
            return []  # an operator undeployed it, or nobody asks for it
        state.target_stages = state.target_stages or state.candidates[0].num_stages
        limits = self.config.limits(Path(state.model_dir).name)
        reading = read_snapshot(state.candidates, state.target_stages, snap, [], self.config, lambda k: True)
        state.target_replicas = min(limits.max_replicas, max(1, limits.min_replicas, reading.needed))
        why = f"scaled to zero; {snap.arrivals} request(s) arrived"
        explain = self.log.explainer(state, snap, reading.scores, 1, reading.placeable)
        return self._scale_out(state, why, now, explain)

    def _scale_out(self, state: ModelState, why: str, now: float, explain: Explain) -> list[Action]:
        replicas = state.replicas()
        if state.target_replicas <= len(replicas):
            return []
        state.under_capacity_since = None
        k = state.target_stages
        template = min(p.pipeline_id for p in replicas) if replicas else state.last_replica
        base = re.sub(r"(-r\d+)+$", "", template) or Path(state.model_dir).name
        taken = {p.pipeline_id for p in (state.snapshot.pipelines if state.snapshot else [])}
        new_id = next(f"{base}-r{i}" for i in itertools.count(1) if f"{base}-r{i}" not in taken | {template})
        reason = self.placeable(state.model_dir, k, "")
        if reason:
            return self._held(state, explain, "scale_out", f"add replica {new_id} ({k} stages)", reason, now)
        decision = explain(
            "scale_out",
            f"add replica {new_id} ({k} stages)",
            pipeline_id=new_id,
            stages_to=k,
            replicas_to=len(replicas) + 1,
            why=why,
        )
        state.added.add(new_id)
        return self.changes.deploy(state, decision, new_id, k, template, now)

    def _scale_in(self, state: ModelState, why: str, now: float, explain: Explain) -> list[Action]:
        surplus = self._surplus(state)
        if not surplus:
            state.under_capacity_since = None
            return []
        if state.under_capacity_since is None:
            state.under_capacity_since = now
        idle_for = now - state.under_capacity_since
        if idle_for < self.config.scale_in_idle_s or not surplus[0].engine_host:
            return []
        victim = surplus[0]
        decision = explain(
            "scale_in",
            f"remove replica {victim.pipeline_id} ({len(victim.stage_units)} stages)",
            pipeline_id=victim.pipeline_id,
            stages_from=len(victim.stage_units),
            replicas_to=len(state.replicas()) - 1,
            why=f"{why}, for {idle_for:.0f} s",
        )
        state.under_capacity_since = None
        return self.changes.drain(state, decision, victim, len(state.replicas()) == 1, now)

    def _surplus(self, state: ModelState) -> list[ev.PipelineLoad]:
        """The serving replicas beyond the target count, in the order they would be removed: those the policy
        added first (an operator's own deploy last), the least loaded, the newest."""
        serving = state.serving()
        extra = len(state.replicas()) - state.target_replicas
        order = sorted(
            serving,
            key=lambda p: (p.pipeline_id not in state.added, p.running + p.waiting, -len(p.pipeline_id), p.pipeline_id),
        )
        return order[: max(0, min(extra, len(serving)))]

    def _granularity(self, state: ModelState, reading: Reading, now: float, explain: Explain) -> list[Action]:
        wanted = max(reading.best, reading.eq11)
        index = {c.num_stages: i for i, c in enumerate(state.candidates)}
        scores = reading.scores
        if wanted != state.target_stages:
            better = scores[index[wanted]] >= (1 + self.config.hysteresis) * scores[index.get(state.target_stages, 0)]
            forced_by_queue = wanted > state.target_stages and wanted == reading.eq11
            if better or forced_by_queue:
                state.proposal_count = state.proposal_count + 1 if state.proposal == wanted else 1
                state.proposal = wanted
            else:
                state.proposal, state.proposal_count = state.target_stages, 0
            confirmed = state.proposal == wanted and state.proposal_count >= self.config.confirm_intervals
            if confirmed and now - state.last_change >= self.config.cooldown_s:
                state.target_stages, state.proposal_count = wanted, 0
                state.last_change, state.target_why = now, reading.why_granularity
        else:
            state.proposal, state.proposal_count = wanted, 0
        surplus = {p.pipeline_id for p in self._surplus(state)}  # about to be removed: not worth re-shaping
        behind = [
            p for p in state.serving() if len(p.stage_units) != state.target_stages and p.pipeline_id not in surplus
        ]
        if not behind:
            return []
        pipeline = min(behind, key=lambda p: (p.running + p.waiting, p.pipeline_id))
        k_from, k_to = len(pipeline.stage_units), state.target_stages
        verb = "split" if k_to > k_from else "merge"
        action = f"{verb} {pipeline.pipeline_id} {k_from} -> {k_to} stages"
        reason = self.placeable(state.model_dir, k_to, pipeline.pipeline_id)
        if reason:
            state.target_stages = k_from
            return self._held(state, explain, "granularity", action, reason, now)
        decision = explain(
            "granularity",
            action,
            pipeline_id=pipeline.pipeline_id,
            stages_from=k_from,
            stages_to=k_to,
            replicas_to=len(state.replicas()),
            why=f"the target is {k_to} stages since {now - state.last_change:.0f} s ago: {state.target_why}",
        )
        return self.changes.refactor(state, decision, pipeline.pipeline_id, now, num_stages=k_to)

    def _rebalance(self, state: ModelState, snap: ev.TrafficSnapshot, now: float, explain: Explain) -> list[Action]:
        if now - state.last_change < self.config.cooldown_s:
            return []
        serving = {p.pipeline_id: p for p in state.serving()}
        for congested in snap.congested:
            pipeline = serving.get(congested.pipeline_id)
            if pipeline is None:
                continue
            load = pipeline.stage_queues or [0] * len(pipeline.stage_units)
            layout = rebalanced_layout(pipeline.stage_units, congested.stage, load)
            if layout is None:
                continue
            decision = explain(
                "rebalance",
                f"rebalance {pipeline.pipeline_id}: stage {congested.stage} gives a unit to its lighter neighbour",
                pipeline_id=pipeline.pipeline_id,
                stages_from=len(pipeline.stage_units),
                stages_to=len(layout),
                replicas_to=len(state.replicas()),
                why=f"stage {congested.stage}'s input queue grew {congested.queue_lengths}",
            )
            state.last_change = now
            return self.changes.refactor(state, decision, pipeline.pipeline_id, now, layout=layout)
        return []

    def _held(self, state: ModelState, explain: Explain, kind: str, action: str, reason: str, now: float) -> list:
        """A change the cluster cannot take: recorded once per cooldown (per action), nothing issued."""
        recent = state.held.get(action)
        if recent is not None and now - recent < max(self.config.cooldown_s, self.config.interval_s):
            return []
        state.held[action] = now
        return [held(explain(kind, action, outcome="held", reason=reason))]
