"""Candidate granularities of a model: measured where ``fpctl profile`` measured them, else estimated.

With two or more measurements, the measurements themselves are the model: between two measured stage counts
T and L are interpolated linearly, beyond the largest they follow the last measured ratio per stage
(geometrically), below the smallest the cost model's ratio (a host whose stages share its cores gains
nothing from more stages, and that shows in the measurements, not in the cost model).

Otherwise the partitioner's cost model (Eq. 2's stage costs) estimates K stages cut by ``partition_model``,
with per-stage costs c_1..c_K (s per micro-batch): throughput ∝ 1 / max_k c_k (K micro-batches in flight,
the slowest stage sets the pace), latency ∝ sum_k c_k + (K - 1) * HOP_OVERHEAD_S; one measured candidate K0
scales both to seconds and tokens/s: T_K = T_K0 * model_T(K) / model_T(K0), L_K = L_K0 * model_L(K) / model_L(K0).
"""

from __future__ import annotations

from pathlib import Path

from common.model.partition import CostModel, partition_model, stage_cost, unit_costs
from common.model.spec import ModelSpec
from common.model.units import unit_names
from common.profile import ModelProfile
from controlplane.policy.candidates import Candidate

HOP_OVERHEAD_S = 0.002  # one stage-to-stage hand-off on a CPU host's shared-memory ring, measured (bench/refactor)
CONTEXT_TOKENS = 512  # the attention context the cost model assumes per decoded token


def model_costs(spec, num_stages: int) -> tuple[float, float]:
    """(pace, latency) of the cost model for ``num_stages`` stages: the slowest stage's and the summed cost
    of one micro-batch, in seconds, hops included in the latency."""
    names = unit_names(spec.num_layers)
    units = unit_costs(spec, context_tokens=CONTEXT_TOKENS)
    cost_model = CostModel(activation_bytes_per_token=spec.hidden_size * spec.dtype_bytes)
    layout = partition_model(spec, num_stages, CONTEXT_TOKENS)
    by_name = {u.name: u for u in units}
    costs = [stage_cost([by_name[n] for n in layout.stage_units(k, names)], cost_model) for k in range(num_stages)]
    return max(costs), sum(costs) + (num_stages - 1) * HOP_OVERHEAD_S


def candidates_for(spec, stage_counts: list[int], profile: ModelProfile | None = None) -> list[Candidate]:
    """One candidate per stage count, measured ones from ``profile`` and the rest estimated (module docstring).
    Without any measurement, throughput is the cost model's tokens/s of one micro-batch of
    ``CostModel.tokens_per_step`` tokens and latency its seconds per token."""
    measured = {c.num_stages: c for c in (profile.candidates if profile else [])}
    modelled = {k: model_costs(spec, k) for k in set(stage_counts) | set(measured)}
    tokens_per_step = CostModel().tokens_per_step
    result = []
    for k in stage_counts:
        if k in measured:
            m = measured[k]
            result.append(Candidate(k, m.throughput_tokens_per_s, m.latency_s, measured=True))
            continue
        pace, latency = modelled[k]
        between = _from_measurements(measured, k)
        if between is not None:
            result.append(Candidate(k, *between))
        elif measured:
            k0 = min(measured, key=lambda j: (abs(j - k), j))
            pace0, latency0 = modelled[k0]
            base = measured[k0]
            result.append(
                Candidate(k, base.throughput_tokens_per_s * pace0 / pace, base.latency_s * latency / latency0)
            )
        else:
            result.append(Candidate(k, tokens_per_step / pace, latency))
    return result


def _from_measurements(measured: dict, k: int) -> tuple[float, float] | None:
    """(T, L) for ``k`` from two or more measured stage counts around or below it; None below the smallest."""
    ks = sorted(measured)
    if len(ks) < 2 or k < ks[0]:
        return None
    if k > ks[-1]:
        a, b = measured[ks[-2]], measured[ks[-1]]
        step = (k - ks[-1]) / (ks[-1] - ks[-2])
        return (
            b.throughput_tokens_per_s * (b.throughput_tokens_per_s / a.throughput_tokens_per_s) ** step,
            b.latency_s * (b.latency_s / a.latency_s) ** step,
        )
    low = max(j for j in ks if j <= k)
    high = min(j for j in ks if j >= k)
    share = 0.0 if high == low else (k - low) / (high - low)
    a, b = measured[low], measured[high]
    return (
        a.throughput_tokens_per_s + share * (b.throughput_tokens_per_s - a.throughput_tokens_per_s),
        a.latency_s + share * (b.latency_s - a.latency_s),
    )


def stage_counts(spec, min_stages: int, max_stages: int) -> list[int]:
    """The stage counts a model can be cut into within [min_stages, max_stages] (at most one per unit)."""
    return list(range(max(1, min_stages), min(max_stages, len(unit_names(spec.num_layers))) + 1))


def load_candidates(model_dir: str, min_stages: int, max_stages: int) -> list[Candidate]:
    """Candidates of the checkpoint in ``model_dir`` with its stored profile, if any. Raises CheckpointError /
    UnsupportedModelError for an unreadable config; a broken profile file is ignored (estimates only)."""
    from common.profile import ProfileError, load_profile

    spec = ModelSpec.from_dir(Path(model_dir))
    try:
        profile = load_profile(model_dir)
    except ProfileError:
        profile = None
    return candidates_for(spec, stage_counts(spec, min_stages, max_stages), profile)
