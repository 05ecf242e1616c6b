"""Every decision of the policy as an event that carries what it saw (``PolicyDecision``), and its log lines."""

from __future__ import annotations

import itertools
from collections import deque
from pathlib import Path
from typing import Callable

from common import events as ev
from common.config import PolicyConfig
from controlplane.actor import Log
from controlplane.policy.candidates import replicas_needed, suited_cv
from controlplane.policy.state import ModelState

MAX_DECISIONS_KEPT = 1000
DEFAULT_OUTPUT_TOKENS = 128  # Eq. 5's demand before any request finished (the Azure conversation trace's median ~ 130)

Explain = Callable[..., ev.PolicyDecision]


def demand_tokens_per_s(snap: ev.TrafficSnapshot) -> float:
    """Eq. 5's mu_total: arrival rate times the mean output tokens of the window's finished requests."""
    return snap.arrival_rate * (snap.output_tokens_mean or DEFAULT_OUTPUT_TOKENS)


class DecisionLog:
    """The decisions taken, numbered ``seq`` 1, 2, ... in order; the newest ``MAX_DECISIONS_KEPT`` are kept."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.decisions: deque[ev.PolicyDecision] = deque(maxlen=MAX_DECISIONS_KEPT)
        self._seq = itertools.count(1)

    def after(self, seq: int, limit: int) -> list[ev.PolicyDecision]:
        return [d for d in self.decisions if d.seq > seq][-max(1, limit) :]

    def explainer(
        self, state: ModelState, snap: ev.TrafficSnapshot, scores: list[float], eq11: int, placeable: dict[int, bool]
    ) -> Explain:
        """``explain(kind, action, **fields)`` records a decision with the snapshot's inputs and every
        candidate's Eq. 4 score, placeability and Eq. 5 replicas, and returns it."""
        demand = demand_tokens_per_s(snap)
        candidates = [
            ev.CandidateScore(
                num_stages=c.num_stages,
                throughput=round(c.throughput, 2),
                latency_s=round(c.latency_s, 6),
                suited_cv=round(suited_cv(c.num_stages, self.config), 3),
                score=round(s, 6),
                replicas=replicas_needed(c, demand, self.config),
                measured=c.measured,
                placeable=placeable.get(c.num_stages, True),
            )
            for c, s in zip(state.candidates, scores)
        ]

        def explain(kind: str, action: str, **fields) -> ev.PolicyDecision:
            decision = ev.PolicyDecision(
                sender="policy",
                seq=next(self._seq),
                at=round(snap.at, 3),
                model_dir=state.model_dir,
                kind=kind,
                action=action,
                arrival_rate=round(snap.arrival_rate, 4),
                cv=round(snap.cv, 4),
                trend=round(snap.trend, 5),
                queues={p.pipeline_id: [p.waiting, *p.stage_queues] for p in snap.pipelines},
                ttft_p99_s=round(snap.ttft_p99_s, 4),
                tpot_p99_s=round(snap.tpot_p99_s, 4),
                candidates=candidates,
                queue_stages=eq11,
                replicas_from=len(state.replicas()),
                **fields,
            )
            self.decisions.append(decision)
            state.decisions_by_kind[kind] = state.decisions_by_kind.get(kind, 0) + 1
            return decision

        return explain


def log_fields(decision: ev.PolicyDecision) -> dict:
    """What a ``policy.*`` log line says of a decision."""
    fields = {
        "seq": decision.seq,
        "model": Path(decision.model_dir).name,
        "kind": decision.kind,
        "action": decision.action,
        "outcome": decision.outcome,
        "pipeline_id": decision.pipeline_id,
        "arrival_rate": decision.arrival_rate,
        "cv": decision.cv,
        "trend": decision.trend,
        "queues": decision.queues,
        "scores": {c.num_stages: c.score for c in decision.candidates},
    }
    if decision.why:
        fields["why"] = decision.why
    if decision.reason:
        fields["reason"] = decision.reason
    if decision.outcome != "issued":
        fields["duration_s"] = decision.duration_s
    return fields


def decided(decision: ev.PolicyDecision) -> Log:
    return Log("policy.decided", log_fields(decision))


def held(decision: ev.PolicyDecision) -> Log:
    return Log("policy.held", log_fields(decision), level="warning")


def ended(decision: ev.PolicyDecision) -> Log:
    level = "info" if decision.outcome in ("committed", "ready", "removed") else "warning"
    return Log("policy.outcome", log_fields(decision), level=level)
