"""Token sampling at the last stage: greedy, temperature, top-k, top-p, seeded; one row at a time
where rows differ, so that one request's numbers never change another's."""

from __future__ import annotations

import torch

from dataplane.transport.messages import SamplingOptions, TokenLogprobs

_SEED_MASK = (1 << 63) - 1
SAMPLING_EPS = 1e-5  # temperatures below this are greedy, the limit they approach (vLLM's _SAMPLING_EPS)


class RowFailure(Exception):
    """One row of logits cannot be sampled (non-finite logits or probabilities)."""


def step_seed(seed: int, step: int) -> int:
    """A generator seed that depends only on the request's seed and its token index,
    so a sequence samples the same tokens whatever micro-batch or stage layout carries it."""
    return (seed * 6364136223846793005 + step * 1442695040888963407 + 1) & _SEED_MASK


def is_greedy(option: SamplingOptions) -> bool:
    return option.temperature < SAMPLING_EPS


def sample(
    logits: torch.Tensor, options: list[SamplingOptions], steps: list[int]
) -> tuple[list[int], list[TokenLogprobs | None] | None, dict[int, str]]:
    """Sample one token per row of ``logits`` [rows, vocab].

    Returns the tokens (-1 for a failed row), the log-probabilities (None when no row asked; per
    row, None where that row did not ask) and ``{row: reason}`` for rows that could not be sampled
    (NaN or infinite logits); the other rows are unaffected by a failed one."""
    logits = logits.float()
    best, argmax = logits.max(dim=-1)
    finite = torch.isfinite(best).tolist()
    tokens = argmax.tolist()
    failures: dict[int, str] = {}
    for row, option in enumerate(options):
        if not finite[row]:
            failures[row] = "the model produced non-finite logits for this request"
        elif not is_greedy(option):
            try:
                tokens[row] = _sample_row(logits[row], option, steps[row])
            except RowFailure as exc:
                failures[row] = str(exc)
    for row in failures:
        tokens[row] = -1
    if all(o.logprobs is None for o in options):
        return tokens, None, failures
    return tokens, _logprobs(logits, tokens, options, failures), failures


def _logprobs(
    logits: torch.Tensor, tokens: list[int], options: list[SamplingOptions], failures: dict[int, str]
) -> list[TokenLogprobs | None]:
    asked = [row for row, o in enumerate(options) if o.logprobs is not None and row not in failures]
    result: list[TokenLogprobs | None] = [None] * len(options)
    if not asked:
        return result
    log_probs = torch.log_softmax(logits[asked], dim=-1)
    for row, values in zip(asked, log_probs):
        k = options[row].logprobs
        top = torch.topk(values, k) if k else None
        result[row] = TokenLogprobs(
            float(values[tokens[row]]), top.indices.tolist() if top else [], top.values.tolist() if top else []
        )
    return result


def _sample_row(row: torch.Tensor, option: SamplingOptions, step: int) -> int:
    # Shifting by the maximum first keeps the division finite for any temperature.
    row = (row - row.max()) / option.temperature
    if 0 < option.top_k < row.shape[0]:
        kth = torch.topk(row, option.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if option.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= option.top_p
        drop[0] = False  # the most likely token always stays, whatever float32 makes of a tiny top_p
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(row, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
        raise RowFailure(f"sampling at temperature {option.temperature} produced no valid distribution")
    generator = torch.Generator().manual_seed(step_seed(option.seed, step))
    return int(torch.multinomial(probs, 1, generator=generator))
