"""Candidate granularities and the paper's scoring rules (FlexPipe Eqs. 4, 5 and 11). Pure arithmetic.

A candidate is a stage count K with throughput T_K (output tokens/s of one replica) and latency L_K
(seconds per output token), measured (``fpctl profile``) or estimated (``controlplane.policy.estimate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config import PolicyConfig


@dataclass(frozen=True, slots=True)
class Candidate:
    """K stages, T_K in tokens/s, L_K in s/token, ``measured`` when both come from a profile."""

    num_stages: int
    throughput: float
    latency_s: float
    measured: bool = False


def suited_cv(num_stages: int, config: PolicyConfig) -> float:
    """nu_k of Eq. 4: the inter-arrival CV a K-stage pipeline suits best, ``base * K ** exponent`` (the
    latency-optimal depth grows like sqrt(CV), the paper's reading of Eq. 1)."""
    return config.suited_cv_base * num_stages**config.suited_cv_exponent


def granularity_scores(candidates: list[Candidate], cv: float, config: PolicyConfig) -> list[float]:
    """Eq. 4 for every candidate: [alpha * T_k / T_max + (1 - alpha) * L_min / L_k] * exp(-|nu_t - nu_k| / sigma),
    with nu_t = ``cv``, the measured CV of inter-arrival times."""
    t_max = max(c.throughput for c in candidates)
    l_min = min(c.latency_s for c in candidates)
    return [
        (config.alpha * c.throughput / t_max + (1 - config.alpha) * l_min / c.latency_s)
        * math.exp(-abs(cv - suited_cv(c.num_stages, config)) / config.sigma)
        for c in candidates
    ]


def replicas_needed(candidate: Candidate, demand_tokens_per_s: float, config: PolicyConfig) -> int:
    """Eq. 5: M = mu_total / mu_k with mu_k = T_k / (beta1 + beta2 * eta_k), rounded up (the paper floors,
    which serves a demand below one replica's capacity with none) and sized so each replica runs at
    ``target_utilization``. ``demand_tokens_per_s`` = arrival rate * mean output tokens."""
    per_replica = candidate.throughput / (config.beta1 + config.beta2 * candidate.num_stages)
    if demand_tokens_per_s <= 0:
        return 0
    return math.ceil(demand_tokens_per_s / (per_replica * config.target_utilization))


def queue_stages(queue_length: float, cv: float, max_stages: int, config: PolicyConfig) -> int:
    """Eq. 11: m = floor(G_max / (1 + beta * exp(-gamma * cv * q_hat))), q_hat = min(q / Q_max, 1): the fuller
    the queue and the burstier the arrivals, the more stages, up to G_max. With ``queue_beta`` 0 (the
    default) beta = G_max - 1, so an empty queue asks for one stage and the expansion is Eq. 4's alone."""
    q_hat = min(queue_length / config.queue_capacity, 1.0)
    beta = config.queue_beta or (max_stages - 1)
    return max(1, math.floor(max_stages / (1 + beta * math.exp(-config.queue_gamma * cv * q_hat)) + 1e-9))
