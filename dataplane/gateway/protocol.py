"""The OpenAI API's request bodies (completions, chat completions) as msgspec schemas, and their
translation into FlexPipe's ``SamplingParams``.

Field names, defaults and meanings follow the OpenAI API reference; ``top_k``, ``ignore_eos`` and
``stop_token_ids`` are extensions (as in vLLM). Fields FlexPipe cannot honour are accepted only at
their neutral value (a penalty of 0, no logit bias, no tools), so a request never silently means
something else.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from common.errors import InvalidRequestError
from dataplane.engine.sampling_params import SamplingParams

MAX_CHOICES = 16
MAX_STOP_STRINGS = 16
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI completions API's default


class BadRequest(InvalidRequestError):
    """A request the OpenAI API would answer with 400; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False


class SamplingFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What both endpoints share."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = []
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/completions``: ``prompt`` is text, a list of texts, token ids or a list of those."""

    prompt: str | list[Any]
    max_tokens: int | None = COMPLETIONS_DEFAULT_MAX_TOKENS
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: str


class ChatCompletionRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/chat/completions``: ``messages`` rendered by the model's chat template."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


def decode_body(body: bytes, schema: type):
    """Parse a JSON request body into ``schema``; raises ``BadRequest`` naming the field."""
    try:
        return msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request: {exc}", _field_of(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None


def _field_of(message: str) -> str | None:
    match = re.search(r"at `\$\.([A-Za-z_]+)", message)
    return match.group(1) if match else None


def stop_strings(request: SamplingFields) -> list[str]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
    return stops


def check_supported(request: SamplingFields) -> None:
    """Refuse what FlexPipe cannot honour, rather than ignore it."""
    if not 1 <= request.n <= MAX_CHOICES:
        raise BadRequest(f"n must be in 1..{MAX_CHOICES}, got {request.n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name) not in (None, 0, 0.0):
            raise BadRequest(f"{name} is not supported (only 0)", name)
    if request.logit_bias:
        raise BadRequest("logit_bias is not supported", "logit_bias")
    if isinstance(request, CompletionRequest):
        if request.echo:
            raise BadRequest("echo is not supported", "echo")
        if request.suffix:
            raise BadRequest("suffix is not supported", "suffix")
        if request.best_of not in (None, request.n):
            raise BadRequest("best_of other than n is not supported", "best_of")
    if isinstance(request, ChatCompletionRequest):
        if request.tools:
            raise BadRequest("tools are not supported", "tools")
        if request.response_format is not None and request.response_format.type != "text":
            raise BadRequest("only response_format type 'text' is supported", "response_format")
        if request.top_logprobs is not None and not request.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")


def max_new_tokens(request: SamplingFields) -> int | None:
    if isinstance(request, ChatCompletionRequest):
        return request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    return request.max_tokens


def num_logprobs(request: SamplingFields) -> int | None:
    """Alternatives per token to return: None = no logprobs at all."""
    if isinstance(request, ChatCompletionRequest):
        return (request.top_logprobs or 0) if request.logprobs else None
    return request.logprobs


def sampling_params(request: SamplingFields, max_tokens: int, seed: int | None) -> SamplingParams:
    """The engine's parameters for one choice; raises ``BadRequest`` naming the field out of range."""
    fields: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "top_k": 0 if request.top_k is None else request.top_k,
        "seed": seed,
        "ignore_eos": request.ignore_eos,
        "stop_token_ids": tuple(request.stop_token_ids),
        "logprobs": num_logprobs(request),
    }
    try:
        return SamplingParams.from_dict(fields)
    except InvalidRequestError as exc:
        name = _field_of(str(exc))
        if name == "max_tokens" and isinstance(request, ChatCompletionRequest):
            name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        if name == "logprobs" and isinstance(request, ChatCompletionRequest):
            name = "top_logprobs"
        raise BadRequest(str(exc), name) from None


def chat_messages(request: ChatCompletionRequest) -> list[dict]:
    """Messages as a chat template takes them: text content only."""
    if not request.messages:
        raise BadRequest("messages must not be empty", "messages")
    messages = []
    for index, message in enumerate(request.messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise BadRequest(f"messages[{index}]: only text content parts are supported", "messages")
            content = "".join(part.text for part in content)
        entry = {"role": message.role, "content": content or ""}
        if message.name:
            entry["name"] = message.name
        messages.append(entry)
    return messages
