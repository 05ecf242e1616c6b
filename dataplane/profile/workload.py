"""The requests a profile measures: ``batch_size`` greedy requests of ``prompt_tokens`` prompt tokens that each
produce exactly ``output_tokens`` tokens (EOS ignored), and the stage counts to measure them at."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from common.errors import InvalidRequestError
from common.model.context import resolve_max_model_len
from common.model.spec import ModelSpec
from dataplane.engine.sampling_params import SamplingParams

MAX_DEFAULT_STAGES = 4
PROMPT_SEED = 0  # the prompts are the same in every run, so profiles of one model compare
WARM_UP_SEED = 1
WARM_UP_OUTPUT_TOKENS = 8


@dataclass(frozen=True)
class Workload:
    """One measured batch: ``batch_size`` concurrent requests, each ``prompt_tokens`` long, each generating
    ``output_tokens`` tokens (at least 2, so that a time per output token after the first exists)."""

    batch_size: int
    prompt_tokens: int
    output_tokens: int

    def check(self, spec: ModelSpec) -> None:
        """Raise ``InvalidRequestError`` when a count is out of range or a request exceeds the model's context."""
        for name, value, least in (
            ("batch", self.batch_size, 1),
            ("prompt tokens", self.prompt_tokens, 1),
            ("output tokens", self.output_tokens, 2),
        ):
            if value < least:
                raise InvalidRequestError(f"{name} must be at least {least}, got {value}")
        context = resolve_max_model_len(spec, None)
        if self.prompt_tokens + self.output_tokens > context:
            raise InvalidRequestError(
                f"{self.prompt_tokens} prompt + {self.output_tokens} output tokens exceed the model's context "
                f"of {context} tokens"
            )

    def prompts(self, spec: ModelSpec, count: int, seed: int = PROMPT_SEED) -> list[list[int]]:
        """``count`` different prompts of ``prompt_tokens`` token ids each, drawn from the vocabulary less its
        special ids."""
        special = {*spec.eos_token_ids, spec.bos_token_id}
        rng = random.Random(seed)
        ids = [token for token in range(spec.vocab_size) if token not in special]
        return [[rng.choice(ids) for _ in range(self.prompt_tokens)] for _ in range(count)]

    def sampling_params(self, output_tokens: int | None = None) -> SamplingParams:
        """Greedy, EOS ignored: every request produces exactly ``output_tokens`` (default: the workload's)."""
        return SamplingParams(max_tokens=output_tokens or self.output_tokens, temperature=0.0, ignore_eos=True)


def default_stage_counts(spec: ModelSpec) -> list[int]:
    """1 up to min(4, the model's layers): every stage holds at least one layer."""
    return list(range(1, min(MAX_DEFAULT_STAGES, spec.num_layers) + 1))


def check_stage_counts(stages: Iterable[int], spec: ModelSpec) -> list[int]:
    """``stages`` sorted without repeats; raises ``InvalidRequestError`` for none, a count below 1 or one above
    the model's layers."""
    counts = sorted(set(stages))
    if not counts:
        raise InvalidRequestError("no stage count to measure")
    bad = [k for k in counts if not 1 <= k <= spec.num_layers]
    if bad:
        raise InvalidRequestError(f"stage counts must be between 1 and the model's {spec.num_layers} layers, got {bad}")
    return counts
