"""The HTTP face of the gateway: OpenAI-compatible routes on Starlette.

``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as server-sent events ending
in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).
Errors use the OpenAI error body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from common.errors import FlexPipeError, RequestFailed
from dataplane.gateway import protocol as api
from dataplane.gateway.replicas import ModelNotFound, NotReady, Overloaded
from dataplane.gateway.responses import ResponseShape, error_body, sse
from dataplane.gateway.service import Gateway, Run

DISCONNECT_POLL_S = 0.25
RETRY_AFTER_S = "1"
MAX_BODY_BYTES = 16 << 20


def error_response(exc: Exception) -> JSONResponse:
    """An exception as the OpenAI API reports it, with its HTTP status."""
    if isinstance(exc, api.BadRequest):
        return JSONResponse(error_body(str(exc), "invalid_request_error", exc.param), 400)
    if isinstance(exc, ModelNotFound):
        return JSONResponse(error_body(str(exc), "invalid_request_error", "model", "model_not_found"), 404)
    if isinstance(exc, Overloaded):
        body = error_body(str(exc), "rate_limit_error", None, "queue_full")
        return JSONResponse(body, 429, headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(exc, NotReady):
        body = error_body(str(exc), "service_unavailable", None, "not_ready")
        return JSONResponse(body, 503, headers={"Retry-After": RETRY_AFTER_S})
    return JSONResponse(error_body(str(exc), "server_error"), 500)


def build_app(gateway: Gateway) -> Starlette:
    """The ASGI application serving ``gateway``."""

    async def completions(request: Request) -> Response:
        return await _generate(gateway, request, api.CompletionRequest)

    async def chat_completions(request: Request) -> Response:
        return await _generate(gateway, request, api.ChatCompletionRequest)

    async def models(_request: Request) -> Response:
        return JSONResponse({"object": "list", "data": gateway.models()})

    async def health(_request: Request) -> Response:
        replicas = gateway.replicas()
        return JSONResponse({"status": "ok", "pipelines": len(replicas), "ready": sum(r.ready for r in replicas)})

    async def metrics(_request: Request) -> Response:
        body, content_type = gateway.metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )


async def _generate(gateway: Gateway, request: Request, schema: type) -> Response:
    arrival = gateway.clock()
    model = "unknown"
    try:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise api.BadRequest(f"the request body exceeds {MAX_BODY_BYTES} bytes")
        parsed = api.decode_body(body, schema)
        model = parsed.model
        run = gateway.prepare(parsed, arrival)
    except FlexPipeError as exc:
        response = error_response(exc)
        gateway.metrics.request_rejected(model, response.status_code)
        return response
    shape = ResponseShape(schema is api.ChatCompletionRequest, run.model, run.tokenizer)
    with_logprobs = api.num_logprobs(parsed) is not None
    if parsed.stream:
        include_usage = parsed.stream_options is not None and parsed.stream_options.include_usage
        return StreamingResponse(
            _events(run, shape, with_logprobs, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        choices = await _until_disconnected(request, _collect(run, shape, with_logprobs))
    except RequestFailed as exc:
        return JSONResponse(error_body(str(exc), "server_error", None, "request_failed"), 500)
    finally:
        run.close()
    if choices is None:  # the client left; nobody reads this
        return Response(status_code=499)
    return JSONResponse(shape.full(choices, run.prompt_tokens, run.completion_tokens))


async def _collect(run: Run, shape: ResponseShape, with_logprobs: bool) -> list[dict]:
    texts: dict[int, list[str]] = {i: [] for i in range(len(run.generations))}
    logprobs: dict[int, list] = {i: [] for i in range(len(run.generations))}
    finish: dict[int, str] = {}
    async for delta in run.deltas():
        texts[delta.index].append(delta.text)
        logprobs[delta.index] += delta.logprobs
        if delta.finish_reason is not None:
            finish[delta.index] = delta.finish_reason
    return [
        shape.choice(i, "".join(texts[i]), finish.get(i), logprobs[i] if with_logprobs else None)
        for i in range(len(run.generations))
    ]


async def _until_disconnected(request: Request, work) -> list[dict] | None:
    """Await ``work``; None (and ``work`` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _events(run: Run, shape: ResponseShape, with_logprobs: bool, include_usage: bool) -> AsyncIterator[bytes]:
    started: set[int] = set()
    try:
        async for delta in run.deltas():
            first = delta.index not in started
            started.add(delta.index)
            if delta.text or delta.finish_reason is not None or first or (with_logprobs and delta.logprobs):
                yield sse(shape.chunk(delta, first, with_logprobs, include_usage))
        if include_usage:
            yield sse(shape.usage_chunk(run.prompt_tokens, run.completion_tokens))
    except RequestFailed as exc:
        yield sse(error_body(str(exc), "server_error", None, "request_failed"))
    finally:
        run.close()
    yield sse("[DONE]")
