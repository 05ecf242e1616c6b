"""Turning prompts into engine sequences and finished sequences into outputs, for one model."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from common.errors import CheckpointError, InvalidRequestError
from common.model.spec import ModelSpec
from dataplane.engine.sampling_params import CompletionOutput, RequestOutput, SamplingParams, plain_number
from dataplane.engine.sequence import Sequence
from dataplane.transport.messages import SamplingOptions


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer, or None when the directory has no tokenizer files."""
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises many types for broken tokenizer files
        raise CheckpointError(f"cannot load the tokenizer of {model_dir}: {exc}") from exc


class RequestFactory:
    """Validates prompts and parameters of one pipeline and builds its ``Sequence`` objects.

    Invariant: every sequence it returns fits the model's context and the pipeline's KV
    cache, has token ids inside the vocabulary and a fixed sampling seed.
    """

    def __init__(self, spec: ModelSpec, tokenizer, max_model_len: int, block_size: int, num_kv_blocks: int) -> None:
        self.spec, self.tokenizer = spec, tokenizer
        self.max_model_len, self.block_size, self.num_kv_blocks = max_model_len, block_size, num_kv_blocks
        self._ids = itertools.count()

    def tokenize(self, prompt) -> list[int]:
        """A prompt (text, or a sequence of integer token ids) as token ids; raises ``InvalidRequestError``
        for anything else (floats, strings or bools among the ids, other types), an empty prompt, ids
        outside the vocabulary or a prompt that leaves no room in the context."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer; pass token ids instead of text")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidRequestError(f"the prompt text is not valid Unicode: {exc}") from None
            tokens = self.tokenizer.encode(prompt)
        else:
            tokens = token_ids(prompt)
        if not tokens:
            raise InvalidRequestError("a prompt must hold at least one token")
        bad = [t for t in tokens if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary of {self.spec.vocab_size}")
        if len(tokens) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt of {len(tokens)} tokens does not fit the model's context of {self.max_model_len} tokens"
            )
        return tokens

    def new_sequence(self, tokens: list[int], params: SamplingParams, on_finish, on_token=None) -> Sequence:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        needed = -(-min(len(tokens) + params.max_tokens, self.max_model_len) // self.block_size)
        if needed > self.num_kv_blocks:
            raise InvalidRequestError(f"request needs {needed} KV blocks but the pipeline has {self.num_kv_blocks}")
        bad = [t for t in params.stop_token_ids if t >= self.spec.vocab_size]
        if bad:
            raise InvalidRequestError(f"stop_token_ids {bad[:5]} are outside the vocabulary of {self.spec.vocab_size}")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        options = SamplingOptions(params.temperature, params.top_k, params.top_p, seed, params.logprobs)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(self.spec.eos_token_ids)
        return Sequence(
            next(self._ids),
            tokens,
            params,
            options,
            frozenset(stop_ids),
            self.max_model_len,
            on_finish,
            on_token=on_token,
        )

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer else ""

    def output(self, seq: Sequence, prompt) -> RequestOutput:
        logprobs = [logprob_dict(lp) for lp in seq.logprobs] if seq.params.logprobs is not None else None
        metrics = {
            "arrival_time": seq.arrival_time,
            "first_token_time": seq.first_token_time,
            "finish_time": seq.finish_time,
            "token_times": list(seq.token_times),
        }
        return RequestOutput(
            seq.seq_id,
            prompt if isinstance(prompt, str) else None,
            seq.prompt_token_ids,
            [
                CompletionOutput(
                    list(seq.output_token_ids), self.decode(seq.output_token_ids), seq.finish_reason, logprobs
                )
            ],
            metrics,
        )


def token_ids(prompt) -> list[int]:
    """``prompt`` as a list of Python ints: a list, tuple or 1-D array of integers (numpy integers
    count; bools, floats, strings do not); raises ``InvalidRequestError`` naming the first bad entry."""
    if not isinstance(prompt, (list, tuple)) and not (hasattr(prompt, "tolist") and getattr(prompt, "ndim", 0) == 1):
        raise InvalidRequestError(f"a prompt must be text or a list of token ids, got {prompt!r:.40}")
    values = plain_number(list(prompt))
    for index, value in enumerate(values):
        if type(value) is not int:
            raise InvalidRequestError(
                f"token id {index} of the prompt is {value!r} ({type(value).__name__}); token ids must be integers"
            )
    return values


def normalize_prompts(prompts) -> list:
    """One prompt (text or token ids) or a list of them, as a list of prompts: a list holding any
    text or sequence is a list of prompts (each judged on its own, so an error names the bad one),
    any other list is one prompt of token ids."""
    if isinstance(prompts, str) or _is_sequence(prompts) and not isinstance(prompts, (list, tuple)):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InvalidRequestError(f"prompts must be text, token ids or a list of them, got {type(prompts).__name__}")
    if any(isinstance(p, str) or _is_sequence(p) for p in prompts):
        return list(prompts)
    return [prompts]


def _is_sequence(value) -> bool:
    return isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) >= 1


def logprob_dict(logprob) -> dict:
    return {"logprob": logprob.logprob, "top": dict(zip(logprob.top_ids, logprob.top_logprobs))}
