"""Prompts longer than the per-step token budget are prefilled in chunks, and a request's tokens,
logprobs and finish reason do not depend on its neighbours, the budget or the number of stages."""

from __future__ import annotations

import random

import msgspec
import pytest
from checkpoints import hf_greedy_tokens

from dataplane import LLM, SamplingParams

NEW_TOKENS = 12


@pytest.mark.parametrize("num_stages", [1, 2])
def test_prompts_longer_than_the_budget_match_transformers(checkpoint, num_stages):
    path = checkpoint("llama")
    rng = random.Random(num_stages)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (17, 40, 100, 3)]
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with LLM(path, num_stages=num_stages, max_num_batched_tokens=16) as llm:
        assert llm.max_num_batched_tokens == 16
        together = [o.token_ids for o in llm.generate(prompts, greedy)]
        alone = [llm.generate([p], greedy)[0].token_ids for p in prompts]
    assert together == alone == hf_greedy_tokens(path, prompts, NEW_TOKENS)


def random_requests(seed: int, count: int, vocab: int = 256) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        prompt = [rng.randrange(vocab) for _ in range(rng.choice([1, 2, 5, 9, 23, 40]))]
        sampled = rng.random() < 0.5
        params = SamplingParams(
            max_tokens=rng.randint(1, 10),
            temperature=0.8 if sampled else 0.0,
            top_k=rng.choice([0, 5]) if sampled else 0,
            top_p=rng.choice([1.0, 0.9]) if sampled else 1.0,
            seed=rng.randrange(1000) if sampled else None,
            logprobs=rng.choice([None, 0, 3]),
        )
        requests.append((prompt, params))
    return requests


def outcome(output) -> tuple:
    logprobs = output.outputs[0].logprobs
    return (
        output.token_ids,
        output.finish_reason,
        None if logprobs is None else [(e["logprob"], sorted(e["top"])) for e in logprobs],
    )


def assert_same(got: tuple, want: tuple) -> None:
    assert got[:2] == want[:2]
    if want[2] is None:
        assert got[2] is None
        return
    assert [top for _, top in got[2]] == [top for _, top in want[2]]
    assert [lp for lp, _ in got[2]] == pytest.approx([lp for lp, _ in want[2]], abs=1e-4)


def test_outputs_do_not_depend_on_batch_composition_budget_or_stage_count(checkpoint):
    path = checkpoint("llama")
    requests = random_requests(seed=11, count=14)
    with LLM(path, num_stages=1) as reference:
        unstopped = [reference.generate([p], params)[0].token_ids for p, params in requests]
        for i in range(0, len(requests), 2):  # stop every other request on a token it would generate
            prompt, params = requests[i]
            stop = unstopped[i][len(unstopped[i]) // 2]
            requests[i] = (prompt, msgspec.structs.replace(params, stop_token_ids=[stop]))
        alone = [outcome(reference.generate([p], params)[0]) for p, params in requests]
    assert any(o[1] == "stop" for o in alone) and any(o[1] == "length" for o in alone), "both endings are exercised"
    rng = random.Random(3)
    for num_stages, budget in ((1, 24), (3, 7)):
        with LLM(path, num_stages=num_stages, max_num_batched_tokens=budget) as llm:
            for _ in range(2):
                chosen = rng.sample(range(len(requests)), rng.randint(3, len(requests)))
                outputs = llm.generate([requests[i][0] for i in chosen], [requests[i][1] for i in chosen])
                for i, output in zip(chosen, outputs):
                    assert_same(outcome(output), alone[i])
