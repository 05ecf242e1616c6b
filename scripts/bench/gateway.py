"""What the HTTP gateway costs: 64 concurrent streaming clients through the OpenAI API vs the offline
``LLM`` on the same prompts, on the embedded default model (SmolLM2-135M-Instruct) at 1 and 2 stages.

For each stage count: a local cluster (``fpctl up --port 0 --stages K``) in a private runtime directory
serves the requests as server-sent events (greedy, ``ignore_eos``, ``--max-tokens`` new tokens each),
then ``LLM(num_stages=K)`` generates the same prompts in one call. TTFT is request sent -> first token
(client side for HTTP; engine arrival -> first token offline), TPOT the gap between a request's
consecutive tokens; output tokens/s is all new tokens over the wall time of the batch. Target: the
gateway keeps >= 90% of the offline tokens/s.

Prints exactly one JSON object on stdout; progress goes to stderr.

    PYTHONPATH=. python scripts/bench/gateway.py [--clients 64] [--max-tokens 32] [--stages 1 2] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

TARGET_TOKENS_PER_S_RATIO = 0.9


def log(*args) -> None:
    print("[gateway]", *args, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))] if ordered else 0.0


def summary(ttft: list[float], tpot: list[float], tokens: int, wall_s: float) -> dict:
    return {
        "ttft_p50_ms": round(percentile(ttft, 50) * 1e3, 1),
        "ttft_p99_ms": round(percentile(ttft, 99) * 1e3, 1),
        "tpot_p50_ms": round(percentile(tpot, 50) * 1e3, 1),
        "tpot_p99_ms": round(percentile(tpot, 99) * 1e3, 1),
        "output_tokens": tokens,
        "wall_s": round(wall_s, 2),
        "output_tokens_per_s": round(tokens / wall_s, 1),
    }


def prompts(count: int) -> list[str]:
    topics = ["rivers", "prime numbers", "bread", "volcanoes", "the moon", "chess", "bees", "glass"]
    return [f"Question {i}: tell me something about {topics[i % len(topics)]}." for i in range(count)]


async def one_stream(client, model: str, prompt: str, max_tokens: int) -> tuple[float, list[float], int]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    arrivals, tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"]:
                arrivals.append(time.perf_counter())
            elif event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return arrivals[0] - sent, gaps, tokens


async def through_gateway(url: str, model: str, batch: list[str], max_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=len(batch) + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        await one_stream(client, model, "warm-up", 4)
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, model, p, max_tokens) for p in batch))
        wall = time.perf_counter() - started
    ttft = [r[0] for r in results]
    tpot = [gap for r in results for gap in r[1]]
    return summary(ttft, tpot, sum(r[2] for r in results), wall)


def fpctl(env: dict, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "controlplane.cli.fpctl", *args], env=env, capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        raise SystemExit(f"fpctl {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def gateway_run(model_dir: Path, stages: int, batch: list[str], max_tokens: int) -> dict:
    runtime = Path(tempfile.mkdtemp(prefix="flexpipe-bench-gw-"))
    (runtime / "none.toml").write_text("")
    env = dict(os.environ, FLEXPIPE_RUNTIME_DIR=str(runtime), FLEXPIPE_CONFIG=str(runtime / "none.toml"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    try:
        fpctl(env, "up", "--workers", str(stages), "--port", "0", "--stages", str(stages), "--model", str(model_dir))
        status = json.loads(fpctl(env, "status", "--json"))
        url = next(h["http_address"] for h in status["engine_hosts"] if h["http_address"])
        return asyncio.run(through_gateway(url, model_dir.name, batch, max_tokens))
    finally:
        subprocess.run([sys.executable, "-m", "controlplane.cli.fpctl", "down"], env=env, capture_output=True)
        subprocess.run(["rm", "-rf", str(runtime)], check=False)


def offline_run(model_dir: Path, stages: int, batch: list[str], max_tokens: int) -> dict:
    from dataplane import LLM, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    with LLM(model_dir, num_stages=stages) as llm:
        llm.generate(["warm-up"], SamplingParams(max_tokens=4, temperature=0.0))
        started = time.perf_counter()
        outputs = llm.generate(batch, params)
        wall = time.perf_counter() - started
    ttft = [o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outputs]
    tpot = [b - a for o in outputs for a, b in zip(o.metrics["token_times"], o.metrics["token_times"][1:])]
    return summary(ttft, tpot, sum(len(o.token_ids) for o in outputs), wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the embedded default model)")
    args = parser.parse_args()
    if args.model is None:
        from dataplane.models.default_model import ensure_default_model

        args.model = ensure_default_model()
    batch = prompts(args.clients)
    result = {
        "model": args.model.name,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "target_gateway_vs_offline_tokens_per_s": TARGET_TOKENS_PER_S_RATIO,
        "cpu_count": os.cpu_count(),
        "stages": {},
    }
    for stages in args.stages:
        log(f"{stages} stage(s): gateway")
        gateway = gateway_run(args.model, stages, batch, args.max_tokens)
        log(f"{stages} stage(s): offline LLM")
        offline = offline_run(args.model, stages, batch, args.max_tokens)
        ratio = gateway["output_tokens_per_s"] / offline["output_tokens_per_s"]
        result["stages"][str(stages)] = {
            "gateway": gateway,
            "offline": offline,
            "gateway_vs_offline_tokens_per_s": round(ratio, 3),
            "meets_target": ratio >= TARGET_TOKENS_PER_S_RATIO,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
