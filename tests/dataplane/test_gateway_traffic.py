"""What the gateway tells the monitor about its traffic, and how it answers for a model scaled to zero."""

from __future__ import annotations

import msgspec
import pytest

from common import events as ev
from common.config import GatewayConfig
from common.wire import decode, encode
from dataplane.gateway import protocol as api
from dataplane.gateway.replicas import ModelNotFound, NotReady
from dataplane.gateway.service import Gateway
from dataplane.gateway.traffic import TrafficRecorder


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_arrivals_and_completions_go_out_once_with_their_ages_at_sending():
    clock = Clock()
    recorder = TrafficRecorder("gw", clock)
    assert recorder.reports() == []
    recorder.arrived("/models/a", 12)
    clock.now = 100.5
    recorder.arrived("/models/b", 3)
    recorder.finished("/models/a", 9, ttft_s=0.2, tpot_s=0.01)
    clock.now = 101.0
    (report,) = recorder.reports()
    assert isinstance(report, ev.TrafficReport) and report.host_id == "gw"
    assert [(a.model_dir, a.prompt_tokens, a.age_s) for a in report.arrivals] == [
        ("/models/a", 12, 1.0),
        ("/models/b", 3, 0.5),
    ]
    assert report.completions == [ev.Completion(model_dir="/models/a", output_tokens=9, ttft_s=0.2, tpot_s=0.01)]
    assert recorder.reports() == []
    assert decode(encode(report)) == report  # it travels on the control bus as any event
    plain = msgspec.msgpack.decode(encode(report))
    assert plain["type"] == "traffic_report" and plain["arrivals"][0] == [1.0, "/models/a", 12]


def test_a_model_scaled_to_zero_answers_503_and_counts_the_request_as_an_arrival():
    parked = {"/models/tiny"}
    gateway = Gateway(lambda: {}, GatewayConfig(), scaled_to_zero=lambda: parked)
    request = api.CompletionRequest(model="tiny", prompt="hello")
    with pytest.raises(NotReady, match="scaled to zero"):
        gateway.prepare(request)
    (report,) = gateway.traffic.reports()
    assert [a.model_dir for a in report.arrivals] == ["/models/tiny"]
    with pytest.raises(ModelNotFound):
        gateway.prepare(api.CompletionRequest(model="other", prompt="hello"))
    assert gateway.traffic.reports() == []
