"""FlexPipe in two minutes: a local cluster serves the embedded SmolLM2-135M-Instruct on 2 stages behind
the OpenAI API, four chat answers stream, and while they stream the pipeline is split to 3 stages.

Run with ``make demo`` (or ``python scripts/demo.py [--model DIR]``). It starts its own cluster in a
private runtime directory and stops it at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What does a pipeline do in a factory?",
    "Write a haiku about the sea.",
]


def fpctl(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "controlplane.cli.fpctl", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"fpctl {' '.join(args)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


def stream_answer(url: str, model: str, question: str, answers: dict, first_token_at: dict) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 96,
        "temperature": 0,
        "stream": True,
    }
    pieces = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                if delta and question not in first_token_at:
                    first_token_at[question] = time.monotonic()
                pieces.append(delta)
                answers[question] = "".join(pieces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    console = Console()
    runtime = Path(tempfile.mkdtemp(prefix="flexpipe-demo-"))
    env = dict(os.environ, FLEXPIPE_RUNTIME_DIR=str(runtime), FLEXPIPE_CONFIG=str(runtime / "none.toml"))
    (runtime / "none.toml").write_text("")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    succeeded = False
    try:
        console.rule("[bold]1. fpctl up --workers 3 --port 0 --stages 2")
        up = ["up", "--workers", "3", "--port", "0", "--stages", "2"] + (["--model", args.model] if args.model else [])
        subprocess.run([sys.executable, "-m", "controlplane.cli.fpctl", *up], env=env, cwd=REPO, check=True)
        status = json.loads(fpctl(env, "status", "--json").stdout)
        url = next(h["http_address"] for h in status["engine_hosts"] if h["http_address"])
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        console.rule(f"[bold]2. four chat requests stream from {url}/v1 ({model})")
        answers: dict[str, str] = {}
        first_token_at: dict[str, float] = {}
        streams = [
            threading.Thread(target=stream_answer, args=(url, model, q, answers, first_token_at)) for q in QUESTIONS
        ]
        for thread in streams:
            thread.start()
        while len(first_token_at) < len(QUESTIONS) and any(t.is_alive() for t in streams):
            time.sleep(0.05)
        console.rule("[bold]3. while they stream: fpctl refactor p0 --stages 3")
        streamed_before = {q: len(a) for q, a in answers.items()}
        outcome = json.loads(fpctl(env, "refactor", "p0", "--stages", "3", "--json").stdout)
        console.print(
            f"refactor [bold]{outcome['kind']}[/bold] {outcome['outcome']}: "
            f"{' | '.join(outcome['old_layout'])}  ->  {' | '.join(outcome['target'])}"
        )
        switch = outcome.get("switch") or {}
        console.print(
            f"stall {switch.get('stall_s', 0) * 1e3:.1f} ms, {switch.get('requests_carried', 0)} requests carried "
            f"with their KV cache; characters streamed when it began: {sum(streamed_before.values())}"
        )
        for thread in streams:
            thread.join()
        console.rule("[bold]4. the answers (none dropped, none restarted)")
        for question in QUESTIONS:
            console.print(f"[bold cyan]Q:[/bold cyan] {question}\n[bold green]A:[/bold green] {answers[question]}\n")
        console.rule("[bold]5. fpctl status")
        print(fpctl(env, "status").stdout)
        succeeded = True
    finally:
        subprocess.run([sys.executable, "-m", "controlplane.cli.fpctl", "down"], env=env, cwd=REPO, timeout=120)
        if succeeded:
            subprocess.run(["rm", "-rf", str(runtime)], check=False)
        else:
            console.print(f"the cluster's log is kept: {runtime / 'cluster.log'}")


if __name__ == "__main__":
    main()
