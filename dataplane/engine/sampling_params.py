"""What a caller asks of one generation, and what it gets back."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from common.errors import InvalidRequestError

MAX_LOGPROBS = 20
INT64_MAX = 2**63 - 1  # what every integer must fit to travel in a MessagePack header
MAX_TEMPERATURE = 1e4  # beyond it float32 sampling is uniform already; the bound keeps temperature finite


class SamplingParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Sampling and stopping rules of one request, validated on construction and on decoding.

    Integers must be integers (numpy integers count; bools and floats are refused), floats finite
    and in range. ``temperature == 0`` is greedy (and so is any temperature below ``1e-5``, the
    limit it approaches); ``top_k`` of 0 or -1 and ``top_p == 1`` disable those filters; with a
    ``seed`` the sampled tokens are reproducible whatever the batch or the pipeline layout.
    ``logprobs=None`` returns no log-probabilities, ``logprobs=k`` the sampled token's and the top
    ``k`` alternatives' at every step (``k = 0``: the sampled token's only).

    Raises ``InvalidRequestError`` naming the field and the value; ``from_dict`` also refuses
    unknown fields. Frozen, so that a validated value stays valid (``msgspec.structs.replace``
    validates the copy).
    """

    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)] = 16
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_TEMPERATURE)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=INT64_MAX)] = 0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] | None = None
    stop_token_ids: tuple[Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)], ...] = ()
    ignore_eos: bool = False
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)] | None = None

    def __post_init__(self) -> None:
        for name, annotation in _FIELD_TYPES.items():
            value = getattr(self, name)
            try:
                checked = msgspec.convert(plain_number(value), annotation, strict=True)
            except msgspec.ValidationError as exc:
                raise InvalidRequestError(f"invalid {name}={value!r}: {exc}") from None
            if checked is not value:
                msgspec.structs.force_setattr(self, name, checked)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> SamplingParams:
        """Build from a mapping (a parsed request body) through the same schema; unknown keys are refused.
        Raises ``InvalidRequestError`` naming the field (as ``$.name``) and what was wrong."""
        if not isinstance(fields, dict):
            raise InvalidRequestError(f"sampling parameters must be an object, got {type(fields).__name__}")
        try:
            return msgspec.convert({k: plain_number(v) for k, v in fields.items()}, cls, strict=True)
        except msgspec.ValidationError as exc:
            raise InvalidRequestError(f"invalid sampling parameters: {exc}") from None


_FIELD_TYPES = {f.name: f.type for f in msgspec.structs.fields(SamplingParams)}


def plain_number(value):
    """``value`` with numpy (or other ``numbers``) integers and reals turned into Python ``int`` and
    ``float``, inside lists and tuples too; bools and everything else unchanged, for the schema to judge."""
    if type(value) in (bool, int, float, str) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [plain_number(v) for v in value]
    if isinstance(value, numbers.Integral):  # numpy integers; numpy bools are not Integral
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "tolist") and hasattr(value, "ndim") and value.ndim == 1:
        return [plain_number(v) for v in value.tolist()]
    return value


@dataclass(slots=True)
class CompletionOutput:
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list | None = None


@dataclass(slots=True)
class RequestOutput:
    """The result of one prompt: generated tokens, text, why it stopped, usage and timings."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    metrics: dict = field(default_factory=dict)

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def usage(self) -> dict:
        prompt, completion = len(self.prompt_token_ids), len(self.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
