"""The gateway under load, on a real local cluster of the tiny model: 200 concurrent streams, a refactor
while they run, clients that leave half-way, a full admission queue, and /metrics read back with the
Prometheus text parser."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from cluster_support import fpctl, gateway_url, local_cluster_env
from prometheus_client.parser import text_string_to_metric_families
from test_gateway_metrics import documented

PROMPT = "the quick brown fox"
MODEL = "flexpipe-tiny-llama-v1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    with local_cluster_env(tmp_path_factory.mktemp("load")) as env:
        fpctl(env, "up", "--workers", "3", "--port", "0", "--stages", "2", "--model", str(tiny_model))
        yield env, gateway_url(env)


async def stream_completion(client: httpx.AsyncClient, max_tokens: int, leave_after: int | None = None) -> dict:
    """One streamed completion read as raw server-sent events; ``leave_after`` chunks, then hang up."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    body["temperature"] = 0.0
    body["stream_options"] = {"include_usage": True}
    chunks, text, finish, done, usage = 0, [], None, False, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"status": response.status_code, "body": json.loads(await response.aread())}
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            assert "error" not in event, event
            if not event["choices"]:
                usage = event["usage"]
                continue
            chunks += 1
            text.append(event["choices"][0]["text"])
            finish = event["choices"][0]["finish_reason"] or finish
            if leave_after is not None and chunks >= leave_after:
                break
    return {
        "status": 200,
        "chunks": chunks,
        "text": "".join(text),
        "finish_reason": finish,
        "done": done,
        "usage": usage,
    }


def metric_values(url: str) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(values: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in values.items() if n == name and wanted <= ls)


def test_200_concurrent_streams_complete_while_the_pipeline_is_refactored(cluster):
    env, url = cluster
    refactors = []

    def refactor_when_streaming() -> None:
        async_running = 0
        while async_running < 50:
            async_running = total(metric_values(url), "flexpipe_requests_running")
        refactors.append(json.loads(fpctl(env, "refactor", "p0", "--stages", "3", "--json").stdout))

    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
            return await asyncio.gather(*(stream_completion(client, 24) for _ in range(200)))

    refactoring = threading.Thread(target=refactor_when_streaming)
    refactoring.start()
    results = asyncio.run(main())
    refactoring.join(timeout=120)
    assert refactors and refactors[0]["outcome"] == "committed", refactors
    assert [r["status"] for r in results] == [200] * 200
    assert all(r["done"] and r["finish_reason"] == "length" for r in results)
    assert all(r["usage"]["completion_tokens"] == 24 for r in results), "every token generated and counted"
    assert len({r["text"] for r in results}) == 1, "greedy: the same prompt gives the same text, refactor or not"

    values = metric_values(url)
    assert total(values, "flexpipe_requests_total", outcome="length") >= 200
    assert total(values, "flexpipe_requests_total", outcome="error") == 0
    assert total(values, "flexpipe_refactors_total", kind="split", outcome="committed") == 1
    assert total(values, "flexpipe_time_to_first_token_seconds_count") >= 200


def test_clients_that_leave_free_their_kv_blocks(cluster):
    _, url = cluster
    before = metric_values(url)

    async def main() -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            kept = [asyncio.create_task(stream_completion(client, 600)) for _ in range(10)]
            left = await asyncio.gather(*(stream_completion(client, 600, leave_after=3) for _ in range(10)))
            running = []
            for _ in range(100):  # the gateway notices each hang-up and aborts its request
                values = metric_values(url)
                running.append(total(values, "flexpipe_requests_running"))
                if running[-1] <= 10:
                    break
                await asyncio.sleep(0.1)
            assert running[-1] <= 10, f"aborted streams still running: {running}"
            assert total(values, "flexpipe_kv_cache_blocks_used") < total(before, "flexpipe_kv_cache_blocks_free")
            return left + await asyncio.gather(*kept)

    results = asyncio.run(main())
    assert all(r["chunks"] == 3 for r in results[:10])
    assert all(r["done"] and r["usage"]["completion_tokens"] == 600 for r in results[10:])
    after = metric_values(url)
    aborted = total(after, "flexpipe_requests_total", outcome="abort") - total(
        before, "flexpipe_requests_total", outcome="abort"
    )
    assert aborted == 10
    assert total(after, "flexpipe_kv_cache_blocks_used") == 0
    assert total(after, "flexpipe_kv_cache_blocks_free") == total(before, "flexpipe_kv_cache_blocks_free")


def test_metrics_parse_and_carry_every_documented_name(cluster):
    _, url = cluster
    text = httpx.get(f"{url}/metrics", timeout=10).text
    exposed = set()
    for family in text_string_to_metric_families(text):
        exposed.add(family.name + "_total" if family.type == "counter" else family.name)
    assert set(documented()) <= exposed, set(documented()) - exposed


def test_requests_for_a_model_spread_over_its_replicas(cluster, tiny_model):
    env, url = cluster
    fpctl(env, "deploy", "--model", str(tiny_model), "--stages", "1", "--pipeline", "p1")
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    assert [(m["id"], sorted(m["pipelines"])) for m in models] == [(MODEL, ["p0", "p1"])]
    seen: dict[str, float] = {}

    async def main() -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            streams = [asyncio.create_task(stream_completion(client, 300)) for _ in range(16)]
            while not all(stream.done() for stream in streams):
                values = metric_values(url)
                for pipeline in ("p0", "p1"):
                    running = total(values, "flexpipe_requests_running", pipeline=pipeline)
                    seen[pipeline] = max(seen.get(pipeline, 0), running)
                await asyncio.sleep(0.2)
            return [stream.result() for stream in streams]

    results = asyncio.run(main())
    assert all(r["done"] and r["usage"]["completion_tokens"] == 300 for r in results)
    assert seen["p0"] >= 4 and seen["p1"] >= 4, seen
    fpctl(env, "undeploy", "p1")


def test_a_full_admission_queue_answers_429_at_once(tmp_path, tiny_model):
    with local_cluster_env(tmp_path, FLEXPIPE_GATEWAY_MAX_WAITING_REQUESTS="2") as env:
        fpctl(env, "up", "--workers", "1", "--port", "0", "--stages", "1", "--model", str(tiny_model))
        url = gateway_url(env)

        async def main() -> list[dict]:
            limits = httpx.Limits(max_connections=128)
            async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
                return await asyncio.gather(*(stream_completion(client, 40) for _ in range(100)))

        results = asyncio.run(main())
        statuses = [r["status"] for r in results]
        capacity = 64 + 2  # max_num_seqs of the deploy + max_waiting_requests
        assert statuses.count(200) >= capacity and statuses.count(429) >= 1, statuses
        assert set(statuses) <= {200, 429}
        refused = next(r for r in results if r["status"] == 429)
        assert refused["body"]["error"]["code"] == "queue_full"
        assert all(r["done"] for r in results if r["status"] == 200)


def test_a_client_that_gives_up_on_a_whole_response_frees_its_request(cluster):
    _, url = cluster
    before = metric_values(url)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=1.0)
    for _ in range(50):
        values = metric_values(url)
        aborted = total(values, "flexpipe_requests_total", outcome="abort")
        if aborted > total(before, "flexpipe_requests_total", outcome="abort"):
            break
        time.sleep(0.1)
    assert aborted == total(before, "flexpipe_requests_total", outcome="abort") + 1
    assert total(values, "flexpipe_requests_running") == 0 and total(values, "flexpipe_kv_cache_blocks_used") == 0
