"""The gateway's Prometheus metrics: the body of ``GET /metrics``, documented family by family in docs/metrics.md.

What happens to a request or a refactor is observed as it happens, into histograms and counters;
what is live (the engines' batches and KV blocks, the cluster's per-stage queues) is read from its
sources at each scrape by ``LiveCollector``. Each ``GatewayMetrics`` owns its registry, so several
gateways (or tests) in one process never share or collide on a series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common import events as ev
from dataplane.gateway.replicas import model_name

# The request buckets (TTFT, inter-token, end-to-end) are vLLM v1's (vllm/v1/metrics/buckets.py:
# TIME_TO_FIRST_TOKEN_BUCKETS, INTER_TOKEN_LATENCY_BUCKETS, REQUEST_LATENCY_BUCKETS), so dashboards and
# SLOs written against vLLM read FlexPipe the same way. The inter-token buckets add 1, 2.5 and 5 ms
# below vLLM's first (10 ms): a small model on a short pipeline decodes faster than that.
TTFT_BUCKETS_S = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
INTER_TOKEN_BUCKETS_S = (
    *(0.001, 0.0025, 0.005),
    *(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
)
REQUEST_BUCKETS_S = (
    *(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0),
    *(30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
)
# Refactor buckets are FlexPipe's own 1-2.5-5 series: a phase runs from milliseconds (COMMIT) to
# minutes (PREPARE reading weights from a checkpoint); the stall is meant to stay in milliseconds.
REFACTOR_PHASE_BUCKETS_S = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 600.0),
)
REFACTOR_STALL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

FINISH_OUTCOMES = frozenset({"stop", "length", "abort", "error"})
REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """One pipeline's engine as the gateway sees it at scrape time: requests and KV blocks (counts)."""

    model: str
    pipeline_id: str
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_free: int


EngineSource = Callable[[], Iterable[EngineSnapshot]]
ClusterSource = Callable[[], ev.StatusReply | None]

_ENGINE_LABELS = ("model", "pipeline")
_ENGINE_GAUGES = (
    ("flexpipe_requests_running", "Requests in the engine's running batch.", "running"),
    ("flexpipe_requests_waiting", "Requests admitted by the engine, waiting to join the running batch.", "waiting"),
    ("flexpipe_kv_cache_blocks_used", "KV-cache blocks held by requests.", "kv_blocks_used"),
    ("flexpipe_kv_cache_blocks_free", "KV-cache blocks free for new tokens.", "kv_blocks_free"),
)
_STAGE_LABELS = ("pipeline", "stage", "worker")
_STAGE_GAUGES = (
    (
        "flexpipe_stage_queue_length",
        "Data messages queued at the stage's input, as its worker last reported.",
        "queue_length",
    ),
    (
        "flexpipe_stage_busy_ratio",
        "Fraction (0-1) of its last report interval the stage spent computing.",
        "busy_fraction",
    ),
)
_BUS_REJECTED = ("flexpipe_control_bus_rejected_messages_total", "Messages the controller's control bus refused.")
_POLICY_DECISIONS = ("flexpipe_policy_decisions_total", "Decisions the autoscaling policy took, by model and kind.")
_PIPELINE_STAGES = ("flexpipe_pipeline_stages", "Stages of each pipeline now (its granularity).")
_MODEL_GAUGES = (
    ("flexpipe_model_replicas", "Replicas (pipelines) of the model counted by the policy now.", "replicas"),
    ("flexpipe_policy_target_stages", "The granularity the policy steers the model's replicas to.", "target_stages"),
    ("flexpipe_policy_target_replicas", "The replica count the policy steers the model to (Eq. 5).", "target_replicas"),
)


class GatewayMetrics:
    """The gateway's metrics, in a registry of their own; ``render()`` answers ``GET /metrics``.

    ``engines`` and ``cluster`` are read at each scrape: the engines of the pipelines this gateway
    serves, and the controller's latest ``StatusReply`` (None while unknown). All durations are seconds.
    """

    def __init__(self, engines: EngineSource = lambda: [], cluster: ClusterSource = lambda: None) -> None:
        self.registry = r = CollectorRegistry()
        self._ttft = Histogram(
            "flexpipe_time_to_first_token_seconds",
            "Time from a request's arrival at the gateway to its first output token.",
            ["model"],
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self._inter_token = Histogram(
            "flexpipe_inter_token_latency_seconds",
            "Time between consecutive output tokens of one request (TPOT).",
            ["model"],
            buckets=INTER_TOKEN_BUCKETS_S,
            registry=r,
        )
        self._request_duration = Histogram(
            "flexpipe_request_duration_seconds",
            "End-to-end latency of a finished request, arrival to last token.",
            ["model"],
            buckets=REQUEST_BUCKETS_S,
            registry=r,
        )
        self._requests = Counter(
            "flexpipe_requests_total", "Requests ended, by outcome.", ["model", "outcome"], registry=r
        )
        self._rejected = Counter(
            "flexpipe_requests_rejected_total",
            "Requests refused before running, by HTTP status.",
            ["model", "status"],
            registry=r,
        )
        self._prompt_tokens = Counter(
            "flexpipe_prompt_tokens_total", "Prompt tokens of finished requests.", ["model"], registry=r
        )
        self._generation_tokens = Counter(
            "flexpipe_generation_tokens_total", "Tokens generated for finished requests.", ["model"], registry=r
        )
        self._refactors = Counter(
            "flexpipe_refactors_total",
            "Refactors ended, by kind and outcome.",
            ["pipeline", "kind", "outcome"],
            registry=r,
        )
        self._refactor_phase = Histogram(
            "flexpipe_refactor_phase_duration_seconds",
            "Duration of one phase of a refactor.",
            ["phase"],
            buckets=REFACTOR_PHASE_BUCKETS_S,
            registry=r,
        )
        self._refactor_stall = Histogram(
            "flexpipe_refactor_stall_seconds",
            "Time a refactor's SWITCH kept the engine from launching anything.",
            buckets=REFACTOR_STALL_BUCKETS_S,
            registry=r,
        )
        self.registry.register(LiveCollector(engines, cluster))

    def first_token(self, model: str, seconds: float) -> None:
        """TTFT: ``seconds`` from the request's arrival at the gateway to its first output token."""
        self._ttft.labels(model=model).observe(seconds)

    def inter_token(self, model: str, seconds: float) -> None:
        """TPOT: ``seconds`` between two consecutive output tokens of one request."""
        self._inter_token.labels(model=model).observe(seconds)

    def request_finished(
        self, model: str, outcome: str, seconds: float, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """A request ended with ``outcome`` (stop, length, abort, error) ``seconds`` after it arrived."""
        if outcome not in FINISH_OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(FINISH_OUTCOMES)}, not {outcome!r}")
        self._requests.labels(model=model, outcome=outcome).inc()
        self._request_duration.labels(model=model).observe(seconds)
        self._prompt_tokens.labels(model=model).inc(prompt_tokens)
        self._generation_tokens.labels(model=model).inc(completion_tokens)

    def request_rejected(self, model: str, status: int) -> None:
        """A request was refused with HTTP ``status`` before it ran."""
        self._rejected.labels(model=model, status=str(status)).inc()
        self._requests.labels(model=model, outcome=REJECTED).inc()

    def refactor_finished(self, outcome: ev.RefactorOutcome) -> None:
        """A refactor ended: count it, observe each phase's seconds and, when SWITCH completed, the stall."""
        self._refactors.labels(pipeline=outcome.pipeline_id, kind=outcome.kind, outcome=outcome.outcome).inc()
        for phase, seconds in outcome.phase_seconds.items():
            self._refactor_phase.labels(phase=phase).observe(seconds)
        if outcome.switch is not None:
            self._refactor_stall.observe(outcome.switch.stall_s)

    def render(self) -> tuple[bytes, str]:
        """The exposition of every family in the Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class LiveCollector(Collector):
    """The families read at scrape time: engines per model and pipeline, stages and the control bus from the
    cluster's status. A source that raises empties its own families; the scrape goes on."""

    def __init__(self, engines: EngineSource, cluster: ClusterSource) -> None:
        self._engines, self._cluster = engines, cluster

    def describe(self) -> list[Metric]:
        return [*engine_families(None), *cluster_families(None)]

    def collect(self) -> list[Metric]:
        return [*_built_or_empty(engine_families, self._engines), *_built_or_empty(cluster_families, self._cluster)]


def engine_families(snapshots: Iterable[EngineSnapshot] | None) -> list[Metric]:
    """Running and waiting requests and KV blocks used and free, per model and pipeline (counts)."""
    families = [GaugeMetricFamily(name, doc, labels=_ENGINE_LABELS) for name, doc, _ in _ENGINE_GAUGES]
    for snapshot in snapshots or ():
        for family, (_, _, field) in zip(families, _ENGINE_GAUGES):
            family.add_metric([snapshot.model, snapshot.pipeline_id], getattr(snapshot, field))
    return families


def cluster_families(status: ev.StatusReply | None) -> list[Metric]:
    """Per-stage input queue length and busy ratio, each pipeline's stage count, the control bus's rejected
    messages (a counter) and the policy's view: decisions by kind, replicas and targets per model."""
    families = [GaugeMetricFamily(name, doc, labels=_STAGE_LABELS) for name, doc, _ in _STAGE_GAUGES]
    rejected = CounterMetricFamily(*_BUS_REJECTED, labels=())
    stages = GaugeMetricFamily(*_PIPELINE_STAGES, labels=("pipeline",))
    policy = policy_families(status.policy if status is not None else None)
    if status is None:
        return [*families, rejected, stages, *policy]
    for pipeline in status.pipelines:
        stages.add_metric([pipeline.pipeline_id], len(pipeline.stages))
        for stage in pipeline.stages:
            labels = [pipeline.pipeline_id, str(stage.stage), stage.worker_id]
            for family, (_, _, field) in zip(families, _STAGE_GAUGES):
                family.add_metric(labels, getattr(stage, field))
    rejected.add_metric([], status.rejected_messages)
    return [*families, rejected, stages, *policy]


def policy_families(view: ev.PolicyView | None) -> list[Metric]:
    decisions = CounterMetricFamily(*_POLICY_DECISIONS, labels=("model", "kind"))
    gauges = [GaugeMetricFamily(name, doc, labels=("model",)) for name, doc, _ in _MODEL_GAUGES]
    for model in view.models if view is not None else ():
        name = model_name(model.model_dir)
        for kind, count in sorted(model.decisions_by_kind.items()):
            decisions.add_metric([name, kind], count)
        for family, (_, _, field) in zip(gauges, _MODEL_GAUGES):
            family.add_metric([name], getattr(model, field))
    return [decisions, *gauges]


def _built_or_empty(build: Callable[[Any], list[Metric]], source: Callable[[], Any]) -> list[Metric]:
    try:
        return build(source())
    except Exception:  # a broken source must not cost the scrape its other families
        return build(None)
