"""The OpenAI API's response bodies, built from choice deltas (completions and chat completions)."""

from __future__ import annotations

import time
import uuid

import msgspec

from dataplane.gateway.choices import ChoiceDelta, TokenLogprob


def response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def sse(payload: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    data = payload if isinstance(payload, str) else msgspec.json.encode(payload).decode()
    return f"data: {data}\n\n".encode()


class ResponseShape:
    """How one endpoint spells a response: ids, objects, and where a choice's text goes."""

    def __init__(self, chat: bool, model: str, tokenizer) -> None:
        self.chat, self.model, self.tokenizer = chat, model, tokenizer
        self.id = response_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: list[TokenLogprob] | None) -> dict:
        rendered = self.logprobs(logprobs) if logprobs is not None else None
        if self.chat:
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "logprobs": rendered, "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": rendered, "finish_reason": finish_reason}

    def chunk(self, delta: ChoiceDelta, first: bool, with_logprobs: bool, include_usage: bool) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        rendered = self.logprobs(delta.logprobs) if with_logprobs else None
        if self.chat:
            content = {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
            if delta.finish_reason is not None and not delta.text and not first:
                content = {}
            choice = {"index": delta.index, "delta": content, "logprobs": rendered}
        else:
            choice = {"index": delta.index, "text": delta.text, "logprobs": rendered}
        choice["finish_reason"] = delta.finish_reason
        body = {**self._head(obj), "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def logprobs(self, entries: list[TokenLogprob]) -> dict:
        if self.chat:
            return {"content": [self._chat_logprob(e) for e in entries]}
        tokens = [self._token(e.token_id) for e in entries]
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self._token(t): lp for t, lp in e.top.items()} for e in entries],
            "text_offset": offsets,
        }

    def _chat_logprob(self, entry: TokenLogprob) -> dict:
        token = self._token(entry.token_id)
        top = [
            {"token": self._token(t), "logprob": lp, "bytes": list(self._token(t).encode())}
            for t, lp in entry.top.items()
        ]
        return {"token": token, "logprob": entry.logprob, "bytes": list(token.encode()), "top_logprobs": top}

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)
