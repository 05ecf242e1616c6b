"""The policy on a real local cluster: load through the gateway turns from steady to bursty and back, and the
cluster changes its granularity and replica count by itself, with every request answered.

The tiny model's profile is written by the test (``fpctl profile`` would measure thousands of tokens/s on it):
it says one replica serves 40 tokens/s at 1 stage and 48 at 2, so the bursty phase's demand needs a second
replica. Policy intervals are seconds instead of minutes so the whole run stays within about two minutes."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from cluster_support import fpctl, gateway_url, local_cluster_env, status

from common.profile import GranularityProfile, ModelProfile, config_sha256, save_profile

POLICY = {
    "FLEXPIPE_POLICY_MODE": "flexpipe",
    "FLEXPIPE_POLICY_INTERVAL_S": "1.0",
    "FLEXPIPE_POLICY_WINDOW_S": "8.0",
    "FLEXPIPE_POLICY_COOLDOWN_S": "5.0",
    "FLEXPIPE_POLICY_CONFIRM_INTERVALS": "1",
    "FLEXPIPE_POLICY_SCALE_IN_IDLE_S": "6.0",
    "FLEXPIPE_POLICY_MIN_ARRIVALS_FOR_CV": "8",
    "FLEXPIPE_POLICY_MAX_REPLICAS": "2",
    "FLEXPIPE_POLICY_MAX_STAGES": "2",
}
MAX_TOKENS = 8


@pytest.fixture
def profiled_model(tmp_path, tiny_model) -> Path:
    model = tmp_path / "policy-tiny"
    shutil.copytree(tiny_model, model)
    save_profile(
        ModelProfile(
            model=model.name,
            config_sha256=config_sha256(model),
            device="test: stated capacity",
            measured_at=datetime.now(timezone.utc).isoformat(),
            prompt_tokens=8,
            output_tokens=MAX_TOKENS,
            candidates=[
                GranularityProfile(num_stages=1, batch_size=8, throughput_tokens_per_s=40.0, latency_s=0.020),
                GranularityProfile(num_stages=2, batch_size=8, throughput_tokens_per_s=48.0, latency_s=0.024),
            ],
        ),
        model,
    )
    return model


def arrival_times(seed: int = 11) -> list[float]:
    """Steady (Poisson, 2.5/s) for 12 s, bursts of 12 requests every 2.5 s for 15 s, then calm (2/s, evenly) 26 s."""
    rng, times, t = random.Random(seed), [], 0.0
    while t < 12.0:
        t += rng.expovariate(2.5)
        times.append(t)
    times += [12.0 + 2.5 * burst for burst in range(6) for _ in range(12)]
    times += [27.0 + 0.5 * i for i in range(52)]
    return sorted(times)


async def send_all(url: str, model: str, times: list[float]) -> list[dict]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as client:
        start = time.monotonic()

        async def one(at: float) -> dict:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            body = {"model": model, "prompt": "the quick brown fox", "max_tokens": MAX_TOKENS, "ignore_eos": True}
            response = await client.post("/v1/completions", json=body)
            return {"status": response.status_code, "body": response.json()}

        return await asyncio.gather(*(one(at) for at in times))


def test_the_policy_follows_the_traffic_by_itself(tmp_path, profiled_model):
    with local_cluster_env(tmp_path, **POLICY) as env:
        fpctl(env, "up", "--workers", "4", "--port", "0", "--stages", "1", "--model", str(profiled_model))
        results = asyncio.run(send_all(gateway_url(env), profiled_model.name, arrival_times()))
        failed = [r for r in results if r["status"] != 200]
        assert not failed, failed[:3]
        assert all(r["body"]["usage"]["completion_tokens"] == MAX_TOKENS for r in results)

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # calm traffic has stopped: back to one replica of one stage
            pipelines = [p for p in status(env)["pipelines"] if p["state"] == "READY"]
            if len(pipelines) == 1 and len(pipelines[0]["stages"]) == 1:
                break
            time.sleep(1.0)
        decisions = json.loads(fpctl(env, "events", "--json").stdout)
        kinds = {(d["kind"], d["outcome"]) for d in decisions}
        splits = [d for d in decisions if d["kind"] == "granularity" and d["stages_to"] > d["stages_from"]]
        merges = [d for d in decisions if d["kind"] == "granularity" and d["stages_to"] < d["stages_from"]]
        assert any(d["outcome"] == "committed" for d in splits), decisions
        assert any(d["outcome"] == "committed" for d in merges), decisions
        assert ("scale_out", "ready") in kinds and ("scale_in", "removed") in kinds, kinds
        for decision in decisions:
            assert decision["candidates"] and decision["arrival_rate"] > 0, decision
        assert max(d["cv"] for d in splits) > min(d["cv"] for d in merges)
        assert len([p for p in status(env)["pipelines"] if p["state"] == "READY"]) == 1

        log = Path(env["FLEXPIPE_RUNTIME_DIR"]) / "cluster.log"
        timeline = json.loads(fpctl(env, "timeline", "--log", str(log), "--json").stdout)
        by_policy = [t for t in timeline if t["by"] == "policy" and t["outcome"] == "committed"]
        assert len(by_policy) >= 2, timeline
        shown = fpctl(env, "events").stdout
        assert "granularity" in shown and "scale_out" in shown and "Eq.4" in shown and "why: " in shown
        assert "policy (flexpipe" in fpctl(env, "status").stdout
        fpctl(env, "policy", "pause")
        assert status(env)["policy"]["paused"] is True
        fpctl(env, "policy", "resume")
        assert status(env)["policy"]["paused"] is False
