"""Chunked prefill: how long one long prompt stalls the streams already decoding.

31 short requests decode; once each has its first token, one 2,000-token prompt arrives. The
short streams' inter-token gaps (TPOT) are measured with the per-step token budget large enough
to prefill the long prompt in one step (``--budget-whole``, i.e. no chunking) and with a small
budget that prefills it in chunks (``--budget-chunked``). Both runs use one checkpoint, written
here with transformers (random weights, Llama architecture, 4,096 positions).

Prints exactly one JSON object on stdout; progress goes to stderr.

    PYTHONPATH=. python scripts/bench/chunked_prefill.py [--stages 1] [--long-prompt 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

TARGET_P99_RATIO_MAX = 0.5  # chunking should at least halve the worst stall of running decodes


def log(*args) -> None:
    print("[chunked_prefill]", *args, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))]


def write_model(path: Path, hidden: int, layers: int) -> Path:
    import torch
    import transformers as tf

    from dataplane.models.tiny import build_byte_tokenizer

    config = tf.LlamaConfig(
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=4096,
        eos_token_id=256,
        bos_token_id=256,
    )
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)
    return path


def run(model: Path, stages: int, budget: int, short: int, long_prompt: int, short_tokens: int) -> dict:
    from dataplane import LLM, SamplingParams

    rng = random.Random(0)
    short_prompts = [[rng.randrange(256) for _ in range(16)] for _ in range(short)]
    long = [rng.randrange(256) for _ in range(long_prompt)]
    stream = SamplingParams(max_tokens=short_tokens, temperature=0.0, ignore_eos=True)
    with LLM(str(model), num_stages=stages, max_num_batched_tokens=budget, max_model_len=4096) as llm:
        llm.generate(short_prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        results: dict = {}
        streams = threading.Thread(target=lambda: results.update(short=llm.generate(short_prompts, stream)))
        streams.start()
        while llm.engine.call(lambda: sum(bool(s.output_token_ids) for s in llm.engine.scheduler.running)) < short:
            time.sleep(0.005)
        arrived = time.perf_counter()
        long_out = llm.generate([long], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
        streams.join()
    gaps = []
    for out in results["short"]:
        times = out.metrics["token_times"]
        gaps += [b - a for a, b in zip(times, times[1:])]
    return {
        "budget": budget,
        "short_tpot_p50_ms": round(percentile(gaps, 50) * 1000, 2),
        "short_tpot_p99_ms": round(percentile(gaps, 99) * 1000, 2),
        "short_tpot_max_ms": round(max(gaps) * 1000, 2),
        "long_ttft_s": round(long_out.metrics["first_token_time"] - arrived, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--short", type=int, default=31, help="decoding streams (default: %(default)s)")
    ap.add_argument("--short-tokens", type=int, default=96, help="tokens per stream (default: %(default)s)")
    ap.add_argument("--long-prompt", type=int, default=2000, help="long prompt tokens (default: %(default)s)")
    ap.add_argument("--budget-whole", type=int, default=2048, help="token budget without chunking")
    ap.add_argument("--budget-chunked", type=int, default=256, help="token budget with chunking")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flexpipe-bench-") as tmp:
        model = write_model(Path(tmp) / "model", args.hidden, args.layers)
        runs = {}
        for name, budget in (("whole", args.budget_whole), ("chunked", args.budget_chunked)):
            runs[name] = run(model, args.stages, budget, args.short, args.long_prompt, args.short_tokens)
            log(name, runs[name])
    ratio = round(runs["chunked"]["short_tpot_p99_ms"] / runs["whole"]["short_tpot_p99_ms"], 3)
    print(
        json.dumps(
            {
                "benchmark": "chunked_prefill",
                "stages": args.stages,
                "short_streams": args.short,
                "long_prompt_tokens": args.long_prompt,
                "model": {"hidden_size": args.hidden, "layers": args.layers},
                "without_chunking": runs["whole"],
                "with_chunking": runs["chunked"],
                "short_tpot_p99_chunked_vs_whole": ratio,
                "target_max": TARGET_P99_RATIO_MAX,
                "meets_target": ratio <= TARGET_P99_RATIO_MAX,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
