"""How long a context a pipeline of a model may serve."""

from __future__ import annotations

from common.errors import InvalidRequestError
from common.model.config_fields import is_int
from common.model.spec import ModelSpec


def resolve_max_model_len(spec: ModelSpec, requested: int | None) -> int:
    """The longest prompt + output, in tokens, a pipeline of ``spec`` serves.

    ``requested`` None or 0 gives the longest context the model allows; a positive value is honoured when at
    most that. The allowed context follows vLLM's ``_get_and_verify_max_len``: GPT-2 ``n_positions``; RoPE
    "default", "llama3", "longrope" ``max_position_embeddings``; "linear", "dynamic" ``max_position_embeddings
    * factor``; "yarn" ``max(max_position_embeddings, original_max_position_embeddings * factor)``.
    Raises InvalidRequestError for a negative value or one beyond the allowed context."""
    allowed = _allowed_context(spec)
    if requested is None or requested == 0:
        return allowed
    if not is_int(requested) or requested < 0:
        raise InvalidRequestError(
            f"max_model_len must be a positive integer (0 or None: the model's), got {requested!r}"
        )
    if requested > allowed:
        raise InvalidRequestError(f"max_model_len {requested} exceeds the {allowed} tokens {_context_reason(spec)}")
    return requested


def _allowed_context(spec: ModelSpec) -> int:
    rope = spec.rope_parameters
    max_pos = spec.max_position_embeddings
    if rope is None or rope["rope_type"] in ("default", "llama3", "longrope"):
        return max_pos
    if rope["rope_type"] in ("linear", "dynamic"):
        return int(max_pos * rope["factor"])
    return max(max_pos, int(rope["original_max_position_embeddings"] * rope["factor"]))


def _context_reason(spec: ModelSpec) -> str:
    rope = spec.rope_parameters
    if rope is None:
        return f"of {spec.architecture}'s n_positions"
    text = f"{spec.architecture} allows with max_position_embeddings {spec.max_position_embeddings}"
    if rope["rope_type"] in ("default", "llama3", "longrope"):
        return f"{text} and rope_type {rope['rope_type']!r}"
    if rope["rope_type"] in ("linear", "dynamic"):
        return f"{text} and rope_type {rope['rope_type']!r} factor {rope['factor']}"
    return (
        f"{text}, rope_type 'yarn' factor {rope['factor']} and original_max_position_embeddings "
        f"{rope['original_max_position_embeddings']}"
    )
