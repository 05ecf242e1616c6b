"""Serving throughput: FlexPipe's pipelined engine vs. Hugging Face ``generate()``.

Draws N concurrent requests (default 32) whose prompt/output lengths come from the
Azure LLM inference trace 2023 (conversation), scaled to the model's context, and
measures useful output tokens/s of

* HF ``generate()`` on left-padded batches (greedy, each batch runs until its longest
  request; only each request's own requested tokens count as useful), and
* FlexPipe's ``LLM`` at 1, 2 and 4 pipeline stages (shm transport), all requests in
  one ``generate`` call, greedy with ``ignore_eos``.

Prints exactly one JSON object on stdout; progress goes to stderr.

    PYTHONPATH=. python scripts/bench/serve_throughput.py [--stages 1,2,4] [--model DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

DEFAULT_TRACE = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "traces"
    / "azure_llm_2023"
    / "AzureLLMInferenceTrace_conv.csv"
)
TARGETS = {"stages1_vs_hf_min": 2.0, "stages2_vs_stages1_min": 0.8}


def log(*args) -> None:
    print("[serve_throughput]", *args, file=sys.stderr, flush=True)


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))])


def make_workload(trace: Path, n: int, seed: int, max_prompt: int, max_output: int, vocab: int = 256):
    """Return ``(prompts, output_lengths)``: trace lengths scaled by max / trace p99, then clipped."""
    with open(trace, newline="") as f:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    rng = random.Random(seed)
    picked = rng.sample(rows, n)
    p_scale = max_prompt / percentile([r[0] for r in rows], 99)
    o_scale = max_output / percentile([r[1] for r in rows], 99)
    prompt_lens = [min(max_prompt, max(4, round(c * p_scale))) for c, _ in picked]
    out_lens = [min(max_output, max(1, round(g * o_scale))) for _, g in picked]
    prompts = [[rng.randrange(vocab) for _ in range(length)] for length in prompt_lens]
    return prompts, out_lens


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


class HfGenerate:
    """HF ``generate()`` over left-padded greedy batches of ``batch_size``."""

    def __init__(self, model_dir: Path, batch_size: int) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        gen_cfg = self.model.generation_config
        self.pad_id = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else 0
        gen_cfg.eos_token_id = None  # never stop early: same as ignore_eos on the FlexPipe side
        gen_cfg.do_sample = False
        self.batch_size = batch_size

    def _batch(self, prompts, out_lens) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(out_lens),
                min_new_tokens=max(out_lens),
                do_sample=False,
                pad_token_id=self.pad_id,
            )
        return [row[width : width + n].tolist() for row, n in zip(out, out_lens)]

    def run(self, prompts, out_lens) -> list[list[int]]:
        tokens = []
        for i in range(0, len(prompts), self.batch_size):
            tokens += self._batch(prompts[i : i + self.batch_size], out_lens[i : i + self.batch_size])
        return tokens

    def close(self) -> None:
        pass


class FlexPipeGenerate:
    """One FlexPipe ``LLM`` with ``stages`` stages on the shm transport; all requests in one ``generate``."""

    def __init__(self, model_dir: Path, stages: int) -> None:
        from dataplane import LLM

        started = time.perf_counter()
        self.llm = LLM(str(model_dir), num_stages=stages, transport="shm")
        self.start_seconds = time.perf_counter() - started

    def run(self, prompts, out_lens) -> list[list[int]]:
        from dataplane import SamplingParams

        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in out_lens]
        return [list(o.token_ids)[:n] for o, n in zip(self.llm.generate(prompts, params), out_lens)]

    def close(self) -> None:
        self.llm.close()


def measure(systems: dict, prompts, out_lens, repeats: int) -> tuple[dict, dict]:
    """Median seconds and the last token lists per system; runs are interleaved round by
    round, so a slow spell of a shared host hits every system alike."""
    for system in systems.values():
        system.run(prompts[:2], [min(4, n) for n in out_lens[:2]])  # warm-up
    seconds: dict = {name: [] for name in systems}
    tokens: dict = {}
    for round_index in range(repeats):
        for name, system in systems.items():
            started = time.perf_counter()
            tokens[name] = system.run(prompts, out_lens)
            seconds[name].append(time.perf_counter() - started)
        log(f"round {round_index + 1}/{repeats}: " + ", ".join(f"{n} {s[-1]:.3f}s" for n, s in seconds.items()))
    return {name: median(s) for name, s in seconds.items()}, tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: the embedded tiny model)")
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Azure LLM trace CSV (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=32, help="concurrent requests (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="workload seed (default: %(default)s)")
    ap.add_argument("--max-prompt", type=int, default=256, help="longest scaled prompt (default: %(default)s)")
    ap.add_argument("--max-output", type=int, default=128, help="longest scaled output (default: %(default)s)")
    ap.add_argument("--hf-batch-size", type=int, default=32, help="HF generate batch size (default: %(default)s)")
    ap.add_argument("--stages", default="1,2,4", help="FlexPipe stage counts, comma-separated (default: %(default)s)")
    ap.add_argument(
        "--repeats", type=int, default=5, help="timed runs per system; the median counts (default: %(default)s)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads in this process (default: %(default)s)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.model is None:
        from dataplane.models.tiny import ensure_tiny_model

        args.model = ensure_tiny_model()
    stage_counts = [int(s) for s in args.stages.split(",") if s.strip()]
    prompts, out_lens = make_workload(args.trace, args.requests, args.seed, args.max_prompt, args.max_output)
    log(f"{len(prompts)} requests, {sum(map(len, prompts))} prompt tokens, {sum(out_lens)} output tokens")

    systems = {"hf": HfGenerate(args.model, args.hf_batch_size)}
    try:
        for k in stage_counts:
            systems[str(k)] = FlexPipeGenerate(args.model, k)
        seconds, tokens = measure(systems, prompts, out_lens, args.repeats)
    finally:
        for system in systems.values():
            system.close()
    useful = sum(out_lens)
    hf_s, hf_useful, hf_tokens = seconds["hf"], useful, tokens["hf"]
    flex, matches = {}, {}
    for k in stage_counts:
        secs = seconds[str(k)]
        flex[str(k)] = {
            "tokens_per_s": round(useful / secs, 2),
            "seconds": round(secs, 3),
            "start_seconds": round(systems[str(k)].start_seconds, 3),
            "output_tokens": useful,
        }
        matches[str(k)] = sum(a == b for a, b in zip(tokens[str(k)], hf_tokens))
        log(f"FlexPipe {k} stage(s): {secs:.3f}s, {useful / secs:.1f} tok/s, {matches[str(k)]}/{len(prompts)} match HF")

    hf_tps = hf_useful / hf_s
    ratio = lambda a, b: round(a / b, 3) if a is not None and b else None  # noqa: E731
    tps = lambda k: flex.get(str(k), {}).get("tokens_per_s")  # noqa: E731
    ratios = {"stages1_vs_hf": ratio(tps(1), hf_tps)}
    ratios.update({f"stages{k}_vs_stages1": ratio(tps(k), tps(1)) for k in stage_counts if k != 1})
    meets = (ratios["stages1_vs_hf"] or 0) >= TARGETS["stages1_vs_hf_min"] and (
        ratios.get("stages2_vs_stages1") or 0
    ) >= TARGETS["stages2_vs_stages1_min"]
    all_match = all(m == len(prompts) for m in matches.values())
    print(
        json.dumps(
            {
                "benchmark": "serve_throughput",
                "model": str(args.model),
                "trace": str(args.trace),
                "seed": args.seed,
                "requests": len(prompts),
                "repeats": args.repeats,
                "prompt_tokens_total": sum(map(len, prompts)),
                "output_tokens_total": sum(out_lens),
                "hf_generate": {
                    "tokens_per_s": round(hf_tps, 2),
                    "seconds": round(hf_s, 3),
                    "batch_size": args.hf_batch_size,
                    "padded_tokens_generated": sum(
                        max(out_lens[i : i + args.hf_batch_size]) * len(out_lens[i : i + args.hf_batch_size])
                        for i in range(0, len(out_lens), args.hf_batch_size)
                    ),
                },
                "flexpipe": flex,
                "ratios": ratios,
                "targets": TARGETS,
                "meets_targets": meets,
                "flexpipe_matches_hf_tokens": all_match,
                "flexpipe_requests_matching_hf": matches,
                "host": {"cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
