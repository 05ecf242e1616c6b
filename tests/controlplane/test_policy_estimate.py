"""Candidate granularities from a profile: measured ones kept, the others estimated from the measurements or
the cost model."""

from __future__ import annotations

from common.model.spec import ModelSpec
from common.profile import GranularityProfile, ModelProfile
from controlplane.policy.estimate import candidates_for, model_costs


def profile(*rows: tuple[int, float, float]) -> ModelProfile:
    return ModelProfile(
        model="m",
        config_sha256="x",
        device="cpu",
        measured_at="now",
        prompt_tokens=8,
        output_tokens=8,
        candidates=[
            GranularityProfile(num_stages=k, batch_size=4, throughput_tokens_per_s=t, latency_s=lat)
            for k, t, lat in rows
        ],
    )


def test_measured_candidates_are_kept_and_the_others_follow_the_measured_trend(tiny_model):
    spec = ModelSpec.from_dir(tiny_model)
    got = {c.num_stages: c for c in candidates_for(spec, [1, 2, 3, 4], profile((1, 100.0, 0.02), (2, 80.0, 0.03)))}
    assert got[1].measured and got[2].measured and not got[3].measured
    assert (got[1].throughput, got[2].latency_s) == (100.0, 0.03)
    assert abs(got[3].throughput - 64.0) < 1e-9 and abs(got[4].throughput - 51.2) < 1e-9  # x0.8 per stage
    assert abs(got[3].latency_s - 0.045) < 1e-9


def test_between_two_measurements_the_estimate_is_interpolated(tiny_model):
    spec = ModelSpec.from_dir(tiny_model)
    got = {c.num_stages: c for c in candidates_for(spec, [1, 2, 3], profile((1, 100.0, 0.02), (3, 200.0, 0.04)))}
    assert abs(got[2].throughput - 150.0) < 1e-9 and abs(got[2].latency_s - 0.03) < 1e-9


def test_one_measurement_is_scaled_by_the_cost_model_and_none_gives_the_cost_model(tiny_model):
    spec = ModelSpec.from_dir(tiny_model)
    one = {c.num_stages: c for c in candidates_for(spec, [1, 2], profile((1, 100.0, 0.02)))}
    pace1, latency1 = model_costs(spec, 1)
    pace2, latency2 = model_costs(spec, 2)
    assert abs(one[2].throughput - 100.0 * pace1 / pace2) < 1e-6
    assert abs(one[2].latency_s - 0.02 * latency2 / latency1) < 1e-9
    bare = candidates_for(spec, [1, 2], None)
    assert not any(c.measured for c in bare) and bare[1].throughput > bare[0].throughput
