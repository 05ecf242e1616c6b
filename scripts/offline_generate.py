"""Offline generation through a 3-stage pipeline of the embedded tiny model (or --model DIR)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataplane import LLM, SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default=None, help="Hugging Face checkpoint directory (default: embedded tiny model)"
    )
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--transport", default="shm")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("prompts", nargs="*", default=["FlexPipe splits a model into", "Pipelines re-shape while"])
    args = parser.parse_args()
    with LLM(args.model, num_stages=args.stages, transport=args.transport) as llm:
        print(f"layout: {llm.layout.describe(llm.unit_names)}", file=sys.stderr)
        outputs = llm.generate(args.prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
    for output in outputs:
        print(
            json.dumps(
                {
                    "prompt": output.prompt,
                    "text": output.text,
                    "token_ids": output.token_ids,
                    "finish_reason": output.finish_reason,
                    "usage": output.usage,
                }
            )
        )


if __name__ == "__main__":
    main()
