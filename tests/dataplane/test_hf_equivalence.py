"""Greedy tokens and logits of FlexPipe pipelines against Hugging Face transformers' own forward."""

from __future__ import annotations

import random

import pytest
import torch
from checkpoints import hf_greedy_tokens
from transformers import AutoModelForCausalLM

from common.model.units import Layout, unit_names
from dataplane import LLM, SamplingParams
from dataplane.models.batch import BatchInput
from dataplane.stage.executor import StageExecutor, StageSpec

NEW_TOKENS = 48
KINDS = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "gpt2": {},
}
# Stage layouts as unit counts for 3 layers (8 units); each multi-stage one cuts between attn and mlp of a layer.
LAYOUTS = {
    1: [[8]],
    2: [[4, 4]],
    3: [[2, 4, 2]],
    4: [[1, 3, 3, 1]],
}


def mixed_prompts(count: int = 16, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.choice([1, 3, 7, 16, 17, 31, 40, 63]))] for _ in range(count)]


_reference_cache: dict = {}


def hf_greedy(model_dir, prompts) -> list[list[int]]:
    key = str(model_dir)
    if key not in _reference_cache:
        _reference_cache[key] = hf_greedy_tokens(model_dir, prompts, NEW_TOKENS)
    return _reference_cache[key]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_greedy_tokens_match_transformers(checkpoint, kind, stages):
    model_dir = checkpoint(kind, **KINDS[kind])
    prompts = mixed_prompts()
    expected = hf_greedy(model_dir, prompts)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for sizes in LAYOUTS[stages]:
        with LLM(model_dir, layout=sizes) as llm:
            assert llm.layout.num_stages == stages
            outputs = llm.generate(prompts, params)
        for prompt_index, (output, reference) in enumerate(zip(outputs, expected)):
            assert output.token_ids == reference, f"{kind} layout {sizes} prompt {prompt_index}"


def run_stages(model_dir, sizes, prompts, block_size=4):
    names = unit_names(3)
    layout = Layout.from_sizes(sizes, len(names))
    stages = [
        StageExecutor(StageSpec(str(model_dir), tuple(layout.stage_units(s, names)), 64, block_size))
        for s in range(layout.num_stages)
    ]
    tables, next_block = [], 0
    for prompt in prompts:
        count = -(-(len(prompt) + 1) // block_size)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count

    def forward(token_lists, starts):
        hidden = None
        batch = BatchInput.build(token_lists, starts, tables, block_size)
        for stage in stages:
            hidden = stage.forward(batch, hidden)
        return hidden

    prefill = forward(prompts, [0] * len(prompts))
    next_tokens = prefill.argmax(-1).tolist()
    decode = forward([[t] for t in next_tokens], [len(p) for p in prompts])
    return prefill, next_tokens, decode


@pytest.mark.parametrize(
    "kind,overrides",
    [
        ("llama", {}),
        ("mistral", {"sliding_window": 6}),
        ("qwen2", {}),
        ("gpt2", {}),
        (
            "llama",
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 10000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                }
            },
        ),
        (
            "qwen2",
            {
                "rope_parameters": {
                    "rope_type": "yarn",
                    "rope_theta": 10000.0,
                    "factor": 4.0,
                    "original_max_position_embeddings": 128,
                }
            },
        ),
    ],
)
@pytest.mark.parametrize("sizes", [[8], [3, 5], [2, 2, 3, 1]])
def test_next_token_logits_match_transformers(checkpoint, kind, overrides, sizes):
    model_dir = checkpoint(kind, **overrides)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = mixed_prompts(6, seed=1)
    prefill, next_tokens, decode = run_stages(model_dir, sizes, prompts)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            reference = model(torch.tensor([prompt])).logits[0, -1]
            torch.testing.assert_close(prefill[i], reference, atol=1e-4, rtol=0)
            reference = model(torch.tensor([prompt + [next_tokens[i]]])).logits[0, -1]
            torch.testing.assert_close(decode[i], reference, atol=1e-4, rtol=0)
