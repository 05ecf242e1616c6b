"""Does the policy pay? One replay of the Azure conversation trace with a burst in the middle, served by a
local cluster of 4 workers and the embedded default model (SmolLM2-135M-Instruct), under three
configurations: ``static`` at 1 stage, ``static`` at the most stages that fit (4, one per worker: the
configuration sized for the burst), and ``flexpipe`` (starting at 1 stage).

The load: ``--requests`` consecutive requests of the trace (``tests/data/azure_llm_2023``, Splitwise ISCA'24),
prompt lengths capped at ``--max-prompt`` tokens and outputs at ``--max-output`` (so a 2-core host can
serve them), arrival times rescaled to ``--rate`` requests/s; the middle third is compressed ``--burst`` times
and rescaled to CV 4 (``controlplane.simulation.traces.with_cv``). Every request streams through the gateway
(greedy, ``ignore_eos``); TTFT and TPOT are measured by the client. SLO attainment is the share of requests
with TTFT <= ``--slo-ttft`` and mean TPOT <= ``--slo-tpot``. Worker-seconds held integrate, over the replay,
the number of workers serving at least one stage (sampled from the controller's status every 0.5 s).

Targets: flexpipe's SLO attainment >= the best static configuration's, and its worker-seconds < those of
static at 4 stages.

Prints exactly one JSON object on stdout; progress goes to stderr.

    PYTHONPATH=. python scripts/bench/adaptive.py [--requests 60] [--rate 0.3] [--burst 4] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gateway import fpctl, one_stream, percentile  # noqa: E402 (the sibling benchmark's client)

from controlplane.simulation.traces import TracedRequest, read_azure_trace, with_cv  # noqa: E402

TRACE = REPO / "tests" / "data" / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
WORKERS = 4
POLICY = {  # seconds instead of the defaults' tens of seconds: the replay lasts minutes, not hours
    "FLEXPIPE_POLICY_INTERVAL_S": "2.0",
    "FLEXPIPE_POLICY_WINDOW_S": "20.0",
    "FLEXPIPE_POLICY_COOLDOWN_S": "15.0",
    "FLEXPIPE_POLICY_SCALE_IN_IDLE_S": "20.0",
    "FLEXPIPE_POLICY_MIN_ARRIVALS_FOR_CV": "8",
    "FLEXPIPE_POLICY_MAX_STAGES": str(WORKERS),
}


def log(*args) -> None:
    print("[adaptive]", *args, file=sys.stderr, flush=True)


def workload(count: int, rate: float, burst: float, max_prompt: int, max_output: int) -> list[TracedRequest]:
    """The trace's first ``count`` requests at ``rate``/s, the middle third ``burst`` times denser at CV 4."""
    trace = [
        TracedRequest(r.at, min(r.prompt_tokens, max_prompt), min(r.output_tokens, max_output))
        for r in read_azure_trace(TRACE, limit=count)
    ]
    scale = (count / rate) / max(trace[-1].at, 1e-9)
    trace = [TracedRequest(r.at * scale, r.prompt_tokens, r.output_tokens) for r in trace]
    first, second = count // 3, 2 * count // 3
    middle = with_cv(trace[first:second], 4.0)
    start = trace[first].at
    squeezed = [TracedRequest(start + (r.at - start) / burst, r.prompt_tokens, r.output_tokens) for r in middle]
    shift = squeezed[-1].at + (trace[second].at - trace[second - 1].at) - trace[second].at
    tail = [TracedRequest(r.at + shift, r.prompt_tokens, r.output_tokens) for r in trace[second:]]
    return trace[:first] + squeezed + tail


class WorkerMeter:
    """Integrates workers serving a stage over time from ``fpctl status``, until ``stop``."""

    def __init__(self, env: dict) -> None:
        self.env, self.seconds, self.samples, self.peak_stages = env, 0.0, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.5):
            try:
                status = json.loads(fpctl(self.env, "status", "--json"))
            except SystemExit:
                continue
            workers = {s["worker_id"] for p in status["pipelines"] for s in p["stages"] if s["worker_id"]}
            now = time.monotonic()
            self.seconds += len(workers) * (now - last)
            last = now
            self.samples.append(len(workers))
            self.peak_stages = max([self.peak_stages] + [len(p["stages"]) for p in status["pipelines"]])

    def __enter__(self) -> WorkerMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


async def replay(url: str, model: str, requests: list[TracedRequest]) -> list[dict]:
    import httpx

    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=256), timeout=900) as client:
        await one_stream(client, model, "warm-up", 4)
        start = time.perf_counter()

        async def one(request: TracedRequest) -> dict:
            await asyncio.sleep(max(0.0, start + request.at - time.perf_counter()))
            prompt = [1000 + (i * 7919) % 20000 for i in range(request.prompt_tokens)]
            try:
                ttft, gaps, tokens = await one_stream(client, model, prompt, request.output_tokens)
            except httpx.HTTPError as exc:
                return {"ok": False, "error": str(exc)}
            return {"ok": True, "ttft": ttft, "tpot": sum(gaps) / len(gaps) if gaps else 0.0, "tokens": tokens}

        results = await asyncio.gather(*(one(r) for r in requests))
        wall = time.perf_counter() - start
    return [dict(r, wall=wall) for r in results]


def run(
    model_dir: Path, label: str, stages: int, mode: str, requests, slo: tuple[float, float], max_replicas: int
) -> dict:
    runtime = Path(tempfile.mkdtemp(prefix=f"flexpipe-bench-adaptive-{label}-"))
    (runtime / "none.toml").write_text("")
    env = dict(os.environ, FLEXPIPE_RUNTIME_DIR=str(runtime), FLEXPIPE_CONFIG=str(runtime / "none.toml"), **POLICY)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["FLEXPIPE_POLICY_MODE"] = mode
    env["FLEXPIPE_POLICY_MAX_REPLICAS"] = str(max_replicas)
    try:
        log(f"{label}: up, {stages} stage(s), policy {mode}")
        fpctl(env, "up", "--workers", str(WORKERS), "--port", "0", "--stages", str(stages), "--model", str(model_dir))
        status = json.loads(fpctl(env, "status", "--json"))
        url = next(h["http_address"] for h in status["engine_hosts"] if h["http_address"])
        with WorkerMeter(env) as meter:
            results = asyncio.run(replay(url, model_dir.name, requests))
        decisions = json.loads(fpctl(env, "events", "--json")) if mode == "flexpipe" else []
    finally:
        subprocess.run([sys.executable, "-m", "controlplane.cli.fpctl", "down"], env=env, capture_output=True)
        subprocess.run(["rm", "-rf", str(runtime)], check=False)
    done = [r for r in results if r["ok"]]
    ttft, tpot = [r["ttft"] for r in done], [r["tpot"] for r in done]
    met = [r for r in done if r["ttft"] <= slo[0] and r["tpot"] <= slo[1]]
    wall = results[0]["wall"] if results else 0.0
    tokens = sum(r["tokens"] for r in done)
    return {
        "stages_at_start": stages,
        "policy": mode,
        "requests": len(results),
        "failed": len(results) - len(done),
        "ttft_p50_s": round(percentile(ttft, 50), 3),
        "ttft_p99_s": round(percentile(ttft, 99), 3),
        "tpot_p50_s": round(percentile(tpot, 50), 4),
        "tpot_p99_s": round(percentile(tpot, 99), 4),
        "slo_attainment": round(len(met) / len(results), 3) if results else 0.0,
        "output_tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
        "worker_seconds": round(meter.seconds, 1),
        "workers_held_mean": round(sum(meter.samples) / len(meter.samples), 2) if meter.samples else 0.0,
        "wall_s": round(wall, 1),
        "decisions": [f"{d['kind']}: {d['action']} -> {d['outcome']}" for d in decisions],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rate", type=float, default=0.3, help="mean requests/s outside the burst")
    parser.add_argument("--burst", type=float, default=4.0, help="how many times denser the middle third is")
    parser.add_argument("--max-prompt", type=int, default=128)
    parser.add_argument("--max-output", type=int, default=32)
    parser.add_argument("--slo-ttft", type=float, default=5.0, help="seconds")
    parser.add_argument("--slo-tpot", type=float, default=0.5, help="seconds per output token")
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the embedded default model)")
    parser.add_argument("--max-replicas", type=int, default=2, help="the flexpipe policy's replica bound")
    parser.add_argument(
        "--configs", nargs="+", default=["static_1", f"static_{WORKERS}", "flexpipe"], help="which to run"
    )
    args = parser.parse_args()
    if args.model is None:
        from dataplane.models.default_model import ensure_default_model

        args.model = ensure_default_model()
    requests = workload(args.requests, args.rate, args.burst, args.max_prompt, args.max_output)
    slo = (args.slo_ttft, args.slo_tpot)
    configs = {"static_1": (1, "static"), f"static_{WORKERS}": (WORKERS, "static"), "flexpipe": (1, "flexpipe")}
    runs = {
        label: run(args.model, label, stages, mode, requests, slo, args.max_replicas)
        for label, (stages, mode) in configs.items()
        if label in args.configs
    }
    result = {
        "benchmark": "adaptive",
        "model": args.model.name,
        "workers": WORKERS,
        "cpu_count": os.cpu_count(),
        "requests": len(requests),
        "trace_span_s": round(requests[-1].at, 1),
        "slo": {"ttft_s": slo[0], "tpot_s": slo[1]},
        "flexpipe_max_replicas": args.max_replicas,
        "runs": runs,
    }
    if len(runs) == len(configs):
        static_max = runs[f"static_{WORKERS}"]["worker_seconds"]
        best_static = max(runs["static_1"]["slo_attainment"], runs[f"static_{WORKERS}"]["slo_attainment"])
        result["flexpipe_slo_vs_best_static"] = round(runs["flexpipe"]["slo_attainment"] - best_static, 3)
        result["flexpipe_worker_seconds_vs_static_max"] = round(runs["flexpipe"]["worker_seconds"] / static_max, 3)
        result["meets_target"] = (
            runs["flexpipe"]["slo_attainment"] >= best_static and runs["flexpipe"]["worker_seconds"] < static_max
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
