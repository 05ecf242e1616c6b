"""Token sampling at the last stage: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import torch

from dataplane.transport.messages import SamplingOptions, TokenLogprobs

_SEED_MASK = (1 << 63) - 1


def step_seed(seed: int, step: int) -> int:
    """A generator seed that depends only on the request's seed and its token index,
    so a sequence samples the same tokens whatever micro-batch or stage layout carries it."""
    return (seed * 6364136223846793005 + step * 1442695040888963407 + 1) & _SEED_MASK


def sample(
    logits: torch.Tensor, options: list[SamplingOptions], steps: list[int]
) -> tuple[list[int], list[TokenLogprobs] | None]:
    logits = logits.float()
    if all(o.temperature == 0.0 for o in options):
        tokens = logits.argmax(dim=-1).tolist()
    else:
        tokens = [_sample_row(row, o, s) for row, o, s in zip(logits, options, steps)]
    if not any(o.logprobs for o in options):
        return tokens, None
    log_probs = torch.log_softmax(logits, dim=-1)
    result = []
    for row, token, option in zip(log_probs, tokens, options):
        top = torch.topk(row, option.logprobs) if option.logprobs else None
        result.append(
            TokenLogprobs(float(row[token]), top.indices.tolist() if top else [], top.values.tolist() if top else [])
        )
    return tokens, result


def _sample_row(row: torch.Tensor, option: SamplingOptions, step: int) -> int:
    if option.temperature == 0.0:
        return int(row.argmax())
    row = row / option.temperature
    if 0 < option.top_k < row.shape[0]:
        kth = torch.topk(row, option.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if option.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= option.top_p
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    generator = torch.Generator().manual_seed(step_seed(option.seed, step))
    return int(torch.multinomial(torch.softmax(row, dim=-1), 1, generator=generator))
