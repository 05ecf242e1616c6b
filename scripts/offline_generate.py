"""Offline generation through a 3-stage pipeline of the embedded default model SmolLM2-135M-Instruct (or --model
DIR): each question is rendered with the model's chat template (text without one is sent as it is) and its greedy
answer printed as one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataplane import LLM, SamplingParams  # noqa: E402


def chat_prompt(tokenizer, question: str) -> list[int] | str:
    """The token ids of `question` as a user turn, ready for the assistant's answer; the text itself when the
    model has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return question
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default=None, help="Hugging Face checkpoint directory (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--transport", default="shm")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "--raw", action="store_true", help="send the questions as plain text, without the chat template"
    )
    parser.add_argument("questions", nargs="*", default=["What is the capital of France?"])
    args = parser.parse_args()
    with LLM(args.model, num_stages=args.stages, transport=args.transport) as llm:
        print(f"layout: {llm.layout.describe(llm.unit_names)}", file=sys.stderr)
        prompts = args.questions if args.raw else [chat_prompt(llm.tokenizer, q) for q in args.questions]
        outputs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
    for question, output in zip(args.questions, outputs):
        print(
            json.dumps(
                {
                    "question": question,
                    "answer": output.text,
                    "token_ids": output.token_ids,
                    "finish_reason": output.finish_reason,
                    "usage": output.usage,
                }
            )
        )


if __name__ == "__main__":
    main()
