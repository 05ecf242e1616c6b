"""vLLM's offline ``LLM`` on one request file: the vLLM half of ``scripts/bench/vs_vllm.py``.

Runs inside vLLM's own virtual environment (``.venv-vllm``, ``scripts/install_vllm.sh``);
imports nothing of FlexPipe. Reads a JSON request file ``{"model": DIR, "prompts":
[[token ids], ...], "max_tokens": [n, ...], "dtype": "float32", "max_model_len": M}``,
generates greedily with ``ignore_eos`` (token-id prompts, so no tokenizer is involved),
and writes one JSON object (``startup_s``, ``warmup_s``, ``generate_s``,
``total_output_tokens``, ``output_tokens_per_s``, ``token_ids``, versions) to ``--out``
and as the last line of stdout. vLLM logs to stdout too: read ``--out``.

    VLLM_CPU_KVCACHE_SPACE=2 .venv-vllm/bin/python scripts/bench/vllm_offline.py requests.json --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def log(*args) -> None:
    print("[vllm_offline]", *args, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("requests", help="request file (JSON)")
    ap.add_argument("--out", help="write the result JSON here too")
    args = ap.parse_args(argv)
    with open(args.requests) as f:
        spec = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # 0.32.0 + torch 2.13 cannot reload its AOT cache

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in spec["prompts"]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in spec["max_tokens"]]

    started = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "float32"),
        max_model_len=spec.get("max_model_len"),
        enable_prefix_caching=spec.get("enable_prefix_caching", False),
        seed=0,
    )
    startup_s = time.perf_counter() - started
    log(f"ready in {startup_s:.1f}s")
    try:
        started = time.perf_counter()
        warm = [TokensPrompt(prompt_token_ids=list(p[:16])) for p in spec["prompts"][:2]]
        llm.generate(warm, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
        warmup_s = time.perf_counter() - started

        started = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        generate_s = time.perf_counter() - started
    finally:
        shutdown = getattr(llm, "shutdown", None) or getattr(getattr(llm, "llm_engine", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    total = sum(len(t) for t in token_ids)
    log(f"{len(token_ids)} requests, {total} output tokens in {generate_s:.2f}s ({total / generate_s:.1f} tokens/s)")
    result = {
        "startup_s": round(startup_s, 3),
        "warmup_s": round(warmup_s, 3),
        "generate_s": round(generate_s, 3),
        "total_output_tokens": total,
        "output_tokens_per_s": round(total / generate_s, 2),
        "dtype": spec.get("dtype", "float32"),
        "enable_prefix_caching": spec.get("enable_prefix_caching", False),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_")},
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
        "token_ids": token_ids,
    }
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
