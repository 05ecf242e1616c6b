"""What the policy reads from one snapshot of a model: every candidate's Eq. 4 score and placeability, Eq. 11's
stage count, Eq. 5's replicas, and the sentences that explain them. Pure: no state is changed here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from common import events as ev
from common.config import PolicyConfig
from controlplane.policy.candidates import Candidate, granularity_scores, queue_stages, replicas_needed
from controlplane.policy.explain import DEFAULT_OUTPUT_TOKENS, demand_tokens_per_s

MIN_ARRIVALS_FOR_RATE = 5  # fewer arrivals in the window than this: Eq. 5 has no rate to size replicas on


@dataclass(frozen=True, slots=True)
class Reading:
    """``cv``: the CV Eq. 4 used (a quiet window counts as calm: ``suited_cv_base``); ``placeable[k]``: K stages
    fit the cluster now; ``best``: Eq. 4's argmax among placeable candidates; ``eq11``: Eq. 11's stage count,
    capped at the largest placeable; ``needed``: Eq. 5's replicas at the target granularity, ``rate_known``:
    enough arrivals to add replicas on (fewer may still remove them); ``slo_missed``: a p99 above its SLO with
    requests waiting; ``why_*``: the reasons."""

    cv: float
    scores: list[float]
    placeable: dict[int, bool]
    best: int
    eq11: int
    needed: int
    rate_known: bool
    slo_missed: bool
    why_granularity: str
    why_replicas: str


def read_snapshot(
    candidates: list[Candidate],
    target_stages: int,
    snap: ev.TrafficSnapshot,
    serving: list[ev.PipelineLoad],
    config: PolicyConfig,
    placeable: Callable[[int], bool],
) -> Reading:
    quiet = snap.arrivals < config.min_arrivals_for_cv
    cv = config.suited_cv_base if quiet else snap.cv
    scores = granularity_scores(candidates, cv, config)
    fits = {c.num_stages: c.num_stages == target_stages or placeable(c.num_stages) for c in candidates}
    usable = [i for i, c in enumerate(candidates) if fits[c.num_stages]] or [0]
    best_index = max(usable, key=lambda i: (scores[i], -i))
    waiting = sum(p.waiting for p in serving) / max(1, len(serving))
    largest = max(candidates[i].num_stages for i in usable)
    eq11 = min(largest, queue_stages(waiting, cv, max(c.num_stages for c in candidates), config))
    best = candidates[best_index].num_stages
    index = {c.num_stages: i for i, c in enumerate(candidates)}
    current_score = scores[index.get(target_stages, 0)]
    if eq11 > best:
        why_granularity = f"Eq. 11: {waiting:.0f} requests waiting per replica at CV {cv:.2f} ask for {eq11} stages"
    else:
        calm = " (too few arrivals for a CV: counted as calm)" if quiet else ""
        why_granularity = (
            f"Eq. 4 at CV {cv:.2f}{calm}: {best} stages score {scores[best_index]:.3f}, "
            f"the target of {target_stages} stages {current_score:.3f}"
        )
    target = candidates[index.get(target_stages, 0)]
    slo_missed = any(p.waiting for p in serving) and (
        snap.ttft_p99_s > config.slo_ttft_s or snap.tpot_p99_s > config.slo_tpot_s
    )
    needed = replicas_needed(target, demand_tokens_per_s(snap), config)
    per_replica = target.throughput / (config.beta1 + config.beta2 * target.num_stages) * config.target_utilization
    tokens = f"{snap.output_tokens_mean:.0f}" if snap.output_tokens_mean else f"{DEFAULT_OUTPUT_TOKENS} (assumed)"
    why_replicas = (
        f"Eq. 5: {snap.arrival_rate:.2f} req/s x {tokens} output tokens = {demand_tokens_per_s(snap):.1f} "
        f"tokens/s needs {needed} replica(s) of {target.num_stages} stages ({per_replica:.1f} tokens/s each)"
    )
    rate_known = snap.arrivals >= MIN_ARRIVALS_FOR_RATE
    if not rate_known:
        why_replicas += f"; only {snap.arrivals} arrivals in the window: too few to add replicas on"
    if slo_missed:
        why_replicas += (
            f"; SLO missed: TTFT p99 {snap.ttft_p99_s:.2f} s (SLO {config.slo_ttft_s} s), "
            f"TPOT p99 {snap.tpot_p99_s:.3f} s (SLO {config.slo_tpot_s} s) with requests waiting"
        )
    return Reading(cv, scores, fits, best, eq11, needed, rate_known, slo_missed, why_granularity, why_replicas)
