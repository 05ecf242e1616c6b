"""A request as the engine tracks it while it generates."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from dataplane.engine.sampling_params import SamplingParams
from dataplane.transport.messages import SamplingOptions, SeqWork


@dataclass(eq=False)
class Sequence:
    """One request's generation state.

    Invariants: KV of ``all_token_ids[:num_computed]`` is in the blocks of
    ``block_table``; a sequence is in at most one in-flight micro-batch
    (``pending_tokens > 0`` exactly while it is); a micro-batch that carries only part of
    the uncomputed tokens (a prefill chunk) samples nothing for it. ``solo`` sequences are
    scheduled alone, to find which request a failed micro-batch failed for.
    """

    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    sampling: SamplingOptions
    stop_ids: frozenset[int]
    max_model_len: int
    on_finish: Callable[[Sequence], None] | None = None
    on_token: Callable[[Sequence], None] | None = None
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    pending_tokens: int = 0
    finish_reason: str | None = None
    error: BaseException | None = None
    solo: bool = False
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def in_flight(self) -> bool:
        return self.pending_tokens > 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def is_prefill(self) -> bool:
        return self.num_computed == 0

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def chunk_in_flight(self) -> bool:
        """Whether the in-flight micro-batch carries only part of the uncomputed tokens."""
        return 0 < self.pending_tokens < self.num_uncomputed

    def work(self, max_tokens: int | None = None) -> SeqWork:
        """The next ``max_tokens`` (default: all) uncomputed tokens as a micro-batch entry, now in flight."""
        end = self.num_tokens if max_tokens is None else min(self.num_tokens, self.num_computed + max_tokens)
        tokens = self.all_token_ids[self.num_computed : end]
        self.pending_tokens = len(tokens)
        return SeqWork(
            self.seq_id, tokens, self.num_computed, list(self.block_table), len(self.output_token_ids), self.sampling
        )

    def chunk_done(self) -> None:
        """The in-flight prefill chunk's KV is written; the rest of the prompt is still to come."""
        self.num_computed += self.pending_tokens
        self.pending_tokens = 0

    def retry(self) -> None:
        """The in-flight micro-batch failed: nothing it carried counts; the tokens go again."""
        self.pending_tokens = 0

    def append_token(self, token: int, logprob=None) -> None:
        """Record a sampled token; decide whether the sequence is finished."""
        now = time.perf_counter()
        self.num_computed += self.pending_tokens
        self.pending_tokens = 0
        self.output_token_ids.append(token)
        self.token_times.append(now)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.first_token_time is None:
            self.first_token_time = now
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.output_token_ids) >= self.params.max_tokens or self.num_tokens >= self.max_model_len:
            self.finish_reason = "length"
        if self.finished:
            self.finish_time = now

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.pending_tokens = 0
        self.finish_reason = "error"
        self.finish_time = time.perf_counter()

    def abort(self) -> None:
        """The caller gave up: finish now with reason ``abort``; any in-flight answer is ignored."""
        self.finish_reason = "abort"
        self.finish_time = time.perf_counter()
