"""The gateway's Prometheus metrics: docs/metrics.md and the exposition agree, observations land where they should."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from common import events as ev
from dataplane.gateway.metrics import EngineSnapshot, GatewayMetrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
DOC_ROW = re.compile(r"^\| `(flexpipe_\w+)` \| (\w+) \| [^|]* \| ([^|]*) \|", re.MULTILINE)
PHASES = {"PREPARE": 1.2, "PRECOPY": 0.4, "SWITCH": 0.03, "COMMIT": 0.002}

ENGINES = [
    EngineSnapshot(model="m", pipeline_id="p1", running=3, waiting=1, kv_blocks_used=40, kv_blocks_free=24),
    EngineSnapshot(model="m2", pipeline_id="p2", running=0, waiting=0, kv_blocks_used=0, kv_blocks_free=64),
]


def status_reply(rejected_messages: int = 7) -> ev.StatusReply:
    stages = [
        ev.StageView(stage=0, worker_id="w0", units=["embed", "L0.attn"], queue_length=2, busy_fraction=0.75),
        ev.StageView(stage=1, worker_id="w1", units=["L0.mlp", "head"], queue_length=0, busy_fraction=0.5),
    ]
    pipeline = ev.PipelineView(
        pipeline_id="p1", state="serving", epoch=3, model_dir="/models/m", engine_host="h0", stages=stages
    )
    model = ev.ModelPolicyView(
        model_dir="/models/m",
        stages=[2, 1],
        replicas=2,
        target_stages=2,
        target_replicas=3,
        arrival_rate=4.0,
        cv=3.5,
        trend=0.1,
        cooldown_left_s=0.0,
        decisions_by_kind={"granularity": 2, "scale_out": 1},
    )
    return ev.StatusReply(
        reply_to=1,
        workers=[],
        engine_hosts=[],
        pipelines=[pipeline],
        rejected_messages=rejected_messages,
        policy=ev.PolicyView(mode="flexpipe", paused=False, models=[model], decisions=3),
    )


def split_outcome(switch: ev.SwitchTiming | None = None) -> ev.RefactorOutcome:
    return ev.RefactorOutcome(
        reply_to=1,
        pipeline_id="p1",
        refactor_id=1,
        epoch=4,
        outcome="committed",
        kind="split",
        phase_seconds=PHASES,
        switch=switch,
    )


def fed_metrics() -> GatewayMetrics:
    """A GatewayMetrics with every source live and at least one observation of every kind."""
    metrics = GatewayMetrics(engines=lambda: ENGINES, cluster=status_reply)
    metrics.first_token("m", 0.3)
    metrics.inter_token("m", 0.02)
    metrics.request_finished("m", "stop", 1.7, prompt_tokens=12, completion_tokens=30)
    metrics.request_rejected("m", 429)
    metrics.refactor_finished(split_outcome(ev.SwitchTiming(stall_s=0.02)))
    return metrics


def families(metrics: GatewayMetrics) -> dict[str, object]:
    body, _ = metrics.render()
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def scrape(metrics: GatewayMetrics) -> dict[tuple[str, frozenset], float]:
    """Every sample of one scrape: (sample name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in families(metrics).values()
        for sample in family.samples
    }


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return scrape(metrics).get((name, frozenset(labels.items())))


def exposed_name(family) -> str:
    return family.name + "_total" if family.type == "counter" else family.name


def documented() -> dict[str, tuple[str, set[str]]]:
    """docs/metrics.md's table: name -> (type, labels)."""
    return {
        name: (kind, set(re.findall(r"`(\w+)`", labels))) for name, kind, labels in DOC_ROW.findall(DOC.read_text())
    }


def exposed_families(metrics: GatewayMetrics) -> dict[str, object]:
    """The exposition's families by name as documented, without prometheus_client's ``_created`` companions."""
    found = families(metrics)
    with_created = {name for name, family in found.items() if family.type in ("counter", "histogram")}
    return {
        exposed_name(family): family
        for name, family in found.items()
        if not (name.endswith("_created") and name.removesuffix("_created") in with_created)
    }


# ---- the doc and the registry ---------------------------------------------------------------------


def test_the_documented_families_are_the_exposed_families():
    assert len(documented()) >= 17
    assert set(documented()) == set(exposed_families(fed_metrics()))


def test_documented_types_and_labels_are_the_exposed_ones():
    exposed = exposed_families(fed_metrics())
    for name, (kind, labels) in documented().items():
        family = exposed[name]
        assert family.samples, f"{name}: fed, yet no samples"
        assert kind == family.type, name
        assert labels == {label for s in family.samples for label in s.labels} - {"le"}, name


def test_names_follow_the_prometheus_conventions():
    for name, (kind, _) in documented().items():
        assert name.startswith("flexpipe_")
        assert name.endswith("_total") == (kind == "counter"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name


# ---- observations -----------------------------------------------------------------------------------


def test_a_first_token_lands_in_its_bucket():
    metrics = GatewayMetrics()
    metrics.first_token("m", 0.3)
    assert value(metrics, "flexpipe_time_to_first_token_seconds_count", model="m") == 1
    assert value(metrics, "flexpipe_time_to_first_token_seconds_sum", model="m") == pytest.approx(0.3)
    assert value(metrics, "flexpipe_time_to_first_token_seconds_bucket", model="m", le="0.25") == 0
    assert value(metrics, "flexpipe_time_to_first_token_seconds_bucket", model="m", le="0.5") == 1
    assert value(metrics, "flexpipe_time_to_first_token_seconds_bucket", model="m", le="+Inf") == 1


def test_inter_token_gaps_are_observed_per_model():
    metrics = GatewayMetrics()
    for gap in (0.004, 0.02, 0.02):
        metrics.inter_token("m", gap)
    assert value(metrics, "flexpipe_inter_token_latency_seconds_count", model="m") == 3
    assert value(metrics, "flexpipe_inter_token_latency_seconds_bucket", model="m", le="0.005") == 1
    assert value(metrics, "flexpipe_inter_token_latency_seconds_bucket", model="m", le="0.025") == 3


def test_a_finished_request_counts_its_outcome_latency_and_tokens():
    metrics = GatewayMetrics()
    metrics.request_finished("m", "stop", 1.7, prompt_tokens=12, completion_tokens=30)
    metrics.request_finished("m", "length", 2.0, prompt_tokens=8, completion_tokens=16)
    metrics.request_finished("m", "stop", 0.9, prompt_tokens=5, completion_tokens=1)
    assert value(metrics, "flexpipe_requests_total", model="m", outcome="stop") == 2
    assert value(metrics, "flexpipe_requests_total", model="m", outcome="length") == 1
    assert value(metrics, "flexpipe_request_duration_seconds_count", model="m") == 3
    assert value(metrics, "flexpipe_request_duration_seconds_bucket", model="m", le="1.0") == 1
    assert value(metrics, "flexpipe_prompt_tokens_total", model="m") == 25
    assert value(metrics, "flexpipe_generation_tokens_total", model="m") == 47


def test_an_unknown_outcome_is_refused():
    with pytest.raises(ValueError, match="outcome"):
        GatewayMetrics().request_finished("m", "done", 1.0, prompt_tokens=1, completion_tokens=1)


def test_a_rejected_request_counts_by_status_and_as_an_outcome():
    metrics = GatewayMetrics()
    metrics.request_rejected("m", 429)
    metrics.request_rejected("m", 429)
    metrics.request_rejected("x", 404)
    assert value(metrics, "flexpipe_requests_rejected_total", model="m", status="429") == 2
    assert value(metrics, "flexpipe_requests_rejected_total", model="x", status="404") == 1
    assert value(metrics, "flexpipe_requests_total", model="m", outcome="rejected") == 2
    assert value(metrics, "flexpipe_request_duration_seconds_count", model="m") is None


def test_a_refactor_counts_and_observes_its_phases_and_stall():
    metrics = GatewayMetrics()
    metrics.refactor_finished(split_outcome(ev.SwitchTiming(stall_s=0.02)))
    assert value(metrics, "flexpipe_refactors_total", pipeline="p1", kind="split", outcome="committed") == 1
    for phase, seconds in PHASES.items():
        assert value(metrics, "flexpipe_refactor_phase_duration_seconds_count", phase=phase) == 1
        assert value(metrics, "flexpipe_refactor_phase_duration_seconds_sum", phase=phase) == pytest.approx(seconds)
    assert value(metrics, "flexpipe_refactor_stall_seconds_count") == 1
    assert value(metrics, "flexpipe_refactor_stall_seconds_bucket", le="0.01") == 0
    assert value(metrics, "flexpipe_refactor_stall_seconds_bucket", le="0.025") == 1


def test_a_refactor_without_a_switch_observes_no_stall():
    metrics = GatewayMetrics()
    metrics.refactor_finished(split_outcome(switch=None))
    assert value(metrics, "flexpipe_refactors_total", pipeline="p1", kind="split", outcome="committed") == 1
    assert value(metrics, "flexpipe_refactor_stall_seconds_count") == 0


# ---- snapshots read at scrape time ------------------------------------------------------------------


def test_engine_snapshots_appear_per_model_and_pipeline():
    metrics = GatewayMetrics(engines=lambda: ENGINES)
    p1, p2 = {"model": "m", "pipeline": "p1"}, {"model": "m2", "pipeline": "p2"}
    assert value(metrics, "flexpipe_requests_running", **p1) == 3
    assert value(metrics, "flexpipe_requests_waiting", **p1) == 1
    assert value(metrics, "flexpipe_kv_cache_blocks_used", **p1) == 40
    assert value(metrics, "flexpipe_kv_cache_blocks_free", **p1) == 24
    assert value(metrics, "flexpipe_kv_cache_blocks_free", **p2) == 64


def test_snapshots_are_read_at_each_scrape():
    running = [1]
    metrics = GatewayMetrics(engines=lambda: [EngineSnapshot("m", "p1", running[0], 0, 0, 8)])
    assert value(metrics, "flexpipe_requests_running", model="m", pipeline="p1") == 1
    running[0] = 5
    assert value(metrics, "flexpipe_requests_running", model="m", pipeline="p1") == 5


def test_the_cluster_status_appears_per_stage_and_for_the_control_bus():
    metrics = GatewayMetrics(cluster=status_reply)
    stage0 = {"pipeline": "p1", "stage": "0", "worker": "w0"}
    stage1 = {"pipeline": "p1", "stage": "1", "worker": "w1"}
    assert value(metrics, "flexpipe_stage_queue_length", **stage0) == 2
    assert value(metrics, "flexpipe_stage_queue_length", **stage1) == 0
    assert value(metrics, "flexpipe_stage_busy_ratio", **stage0) == 0.75
    assert value(metrics, "flexpipe_stage_busy_ratio", **stage1) == 0.5
    assert value(metrics, "flexpipe_control_bus_rejected_messages_total") == 7


def test_an_unknown_cluster_leaves_its_families_present_and_empty():
    found = families(GatewayMetrics(cluster=lambda: None))
    for name in ("flexpipe_stage_queue_length", "flexpipe_stage_busy_ratio", "flexpipe_control_bus_rejected_messages"):
        assert found[name].samples == []


def broken() -> list:
    raise RuntimeError("engine host gone")


def half_broken():
    yield ENGINES[0]
    raise RuntimeError("engine host gone mid-read")


@pytest.mark.parametrize("engines", [broken, half_broken], ids=["raises", "raises-mid-read"])
def test_a_raising_source_empties_its_families_and_the_scrape_goes_on(engines):
    metrics = GatewayMetrics(engines=engines, cluster=status_reply)
    metrics.first_token("m", 0.3)
    found = families(metrics)
    assert found["flexpipe_requests_running"].samples == []
    assert found["flexpipe_kv_cache_blocks_used"].samples == []
    assert value(metrics, "flexpipe_time_to_first_token_seconds_count", model="m") == 1
    assert value(metrics, "flexpipe_control_bus_rejected_messages_total") == 7


def test_a_raising_cluster_leaves_the_engines():
    metrics = GatewayMetrics(engines=lambda: ENGINES, cluster=broken)
    assert families(metrics)["flexpipe_stage_queue_length"].samples == []
    assert value(metrics, "flexpipe_requests_running", model="m", pipeline="p1") == 3


def test_two_gateways_in_one_process_do_not_collide():
    first, second = GatewayMetrics(engines=lambda: ENGINES[:1]), GatewayMetrics(engines=lambda: ENGINES[1:])
    first.request_rejected("m", 503)
    assert value(first, "flexpipe_requests_rejected_total", model="m", status="503") == 1
    assert value(second, "flexpipe_requests_rejected_total", model="m", status="503") is None
    assert value(second, "flexpipe_requests_running", model="m", pipeline="p1") is None
    assert REGISTRY.get_sample_value("flexpipe_requests_rejected_total", {"model": "m", "status": "503"}) is None


def test_render_answers_the_prometheus_text_format():
    body, content_type = fed_metrics().render()
    assert content_type == CONTENT_TYPE_LATEST and content_type.startswith("text/plain; version=")
    assert b"# TYPE flexpipe_requests_total counter" in body
