"""The monitor's request-pattern analysis: per model, arrivals and completions over a sliding window, and
per stage, whether its input queue keeps growing (congestion). Pure: the monitor feeds reports and time."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from common import events as ev
from controlplane.policy.arrivals import ArrivalWindow


def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(values, q)) if values else 0.0


@dataclass
class ModelTraffic:
    """One model's window of arrivals (controller clock) and of finished requests."""

    window_s: float
    first_seen: float
    arrivals: ArrivalWindow = field(init=False)
    completions: deque = field(default_factory=deque)  # (at, output_tokens, ttft_s, tpot_s)

    def __post_init__(self) -> None:
        self.arrivals = ArrivalWindow(self.window_s)

    def expire(self, now: float) -> None:
        self.arrivals.expire(now)
        while self.completions and self.completions[0][0] < now - self.window_s:
            self.completions.popleft()


class CongestionDetector:
    """A stage is congested when its input queue grew in each of the last ``intervals`` samples and is at least
    ``min_queue`` long. Invariant: keeps ``intervals + 1`` samples per stage, one per ``sample`` call."""

    def __init__(self, intervals: int, min_queue: int) -> None:
        self.intervals, self.min_queue = intervals, min_queue
        self.history: dict[tuple[str, int], deque[int]] = {}

    def sample(self, pipeline_id: str, queues: list[int]) -> list[ev.CongestedStage]:
        found = []
        for stage, length in enumerate(queues):
            history = self.history.setdefault((pipeline_id, stage), deque(maxlen=self.intervals + 1))
            history.append(length)
            values = list(history)
            growing = len(values) == self.intervals + 1 and all(b > a for a, b in zip(values, values[1:]))
            if growing and values[-1] >= self.min_queue:
                found.append(ev.CongestedStage(pipeline_id=pipeline_id, stage=stage, queue_lengths=values))
        return found

    def forget(self, pipeline_id: str) -> None:
        """A pipeline was re-shaped or removed: its stages' histories no longer describe one queue each."""
        for key in [k for k in self.history if k[0] == pipeline_id]:
            del self.history[key]


class TrafficAnalysis:
    """Everything the monitor knows about request patterns; ``snapshots`` is called once per policy interval."""

    def __init__(self, window_s: float, congestion_intervals: int, congestion_min_queue: int) -> None:
        self.window_s = window_s
        self.models: dict[str, ModelTraffic] = {}
        self.congestion = CongestionDetector(congestion_intervals, congestion_min_queue)
        self.epochs: dict[str, int] = {}

    def model(self, model_dir: str, now: float) -> ModelTraffic:
        if model_dir not in self.models:
            self.models[model_dir] = ModelTraffic(self.window_s, now)
        return self.models[model_dir]

    def report(self, report: ev.TrafficReport, now: float) -> None:
        for arrival in report.arrivals:
            self.model(arrival.model_dir, now).arrivals.add(now - max(0.0, arrival.age_s), arrival.prompt_tokens)
        for done in report.completions:
            self.model(done.model_dir, now).completions.append((now, done.output_tokens, done.ttft_s, done.tpot_s))

    def snapshots(self, now: float, pipelines: dict[str, list[ev.PipelineLoad]]) -> list[ev.TrafficSnapshot]:
        """One snapshot per model that has traffic or pipelines; ``pipelines`` maps model dir to its replicas."""
        for model_dir in pipelines:
            self.model(model_dir, now)
        return [
            self._snapshot(model_dir, traffic, now, pipelines.get(model_dir, []))
            for model_dir, traffic in self.models.items()
        ]

    def _snapshot(
        self, model_dir: str, traffic: ModelTraffic, now: float, replicas: list[ev.PipelineLoad]
    ) -> ev.TrafficSnapshot:
        traffic.expire(now)
        stats = traffic.arrivals.stats(now, traffic.first_seen)
        prompts = [float(p) for p in traffic.arrivals.prompt_tokens]
        outputs = [c[1] for c in traffic.completions]
        ttfts = [c[2] for c in traffic.completions]
        tpots = [c[3] for c in traffic.completions if c[1] > 1]
        congested = []
        for replica in replicas:
            if self.epochs.get(replica.pipeline_id) != replica.epoch:
                self.congestion.forget(replica.pipeline_id)
                self.epochs[replica.pipeline_id] = replica.epoch
            if replica.state == "READY":
                congested += self.congestion.sample(replica.pipeline_id, replica.stage_queues)
        return ev.TrafficSnapshot(
            sender="monitor",
            model_dir=model_dir,
            at=now,
            window_s=self.window_s,
            arrivals=stats.arrivals,
            arrival_rate=stats.rate,
            cv=stats.cv,
            trend=stats.trend,
            prompt_tokens_p50=_quantile(prompts, 0.5),
            prompt_tokens_p90=_quantile(prompts, 0.9),
            output_tokens_mean=float(np.mean(outputs)) if outputs else 0.0,
            ttft_p50_s=_quantile(ttfts, 0.5),
            ttft_p99_s=_quantile(ttfts, 0.99),
            tpot_p50_s=_quantile(tpots, 0.5),
            tpot_p99_s=_quantile(tpots, 0.99),
            pipelines=replicas,
            congested=congested,
        )
