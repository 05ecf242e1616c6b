"""The gateway's request handling, independent of HTTP: admit, tokenize, run the choices, account.

``Gateway.prepare`` turns a parsed OpenAI request into a ``Run`` that is already submitted to the
engine of the chosen replica; the HTTP layer renders its deltas as one JSON body or as events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Callable

from common.config import GatewayConfig
from common.errors import InvalidRequestError
from dataplane.gateway import protocol as api
from dataplane.gateway.choices import ChoiceDelta, Timing, choice_deltas, interleave
from dataplane.gateway.generation import Generation
from dataplane.gateway.metrics import EngineSnapshot, GatewayMetrics
from dataplane.gateway.replicas import ModelNotFound, NotReady, Replica, ReplicaRouter, model_name
from dataplane.gateway.traffic import TrafficRecorder


class Run:
    """The choices of one request on one replica. Invariants: ``close`` (idempotent) aborts every choice
    still generating and releases the replica's admission slot exactly once, and records the outcome."""

    def __init__(
        self,
        gateway: Gateway,
        replica: Replica,
        model: str,
        generations: list[Generation],
        stops: list[str],
        prompt_tokens: int,
        arrival: float,
    ) -> None:
        self.gateway, self.replica, self.model = gateway, replica, model
        self.generations, self.stops = generations, stops
        self.timings = [Timing(arrival) for _ in generations]
        self.prompt_tokens = prompt_tokens
        self.model_dir = generations[0].hosted.deployed_model_dir
        self.completion_tokens = 0
        self.finish_reasons: dict[int, str] = {}
        self.failed = False
        self.closed = False

    @property
    def tokenizer(self):
        return self.generations[0].hosted.requests.tokenizer

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        streams = [
            choice_deltas(index, generation, self.tokenizer, self.stops, timing)
            for index, (generation, timing) in enumerate(zip(self.generations, self.timings))
        ]
        try:
            async for delta in interleave(streams):
                self.completion_tokens += len(delta.token_ids)
                if delta.finish_reason is not None:
                    self.finish_reasons[delta.index] = delta.finish_reason
                yield delta
        except BaseException:
            self.failed = True
            raise
        finally:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for generation in self.generations:
            generation.cancel("the client went away")
        self.gateway.router.release(self.replica)
        self._record()

    def _record(self) -> None:
        complete = len(self.finish_reasons) == len(self.generations)
        if self.failed and not complete:
            outcome = "error" if any(g.done for g in self.generations) else "abort"
        elif not complete:
            outcome = "abort"
        else:
            outcome = "length" if "length" in self.finish_reasons.values() else "stop"
        metrics, model = self.gateway.metrics, self.model
        for timing in self.timings:
            if timing.first_token is not None:
                metrics.first_token(model, timing.first_token)
            for gap in timing.inter_token:
                metrics.inter_token(model, gap)
            if complete and timing.first_token is not None:
                tpot = sum(timing.inter_token) / len(timing.inter_token) if timing.inter_token else 0.0
                self.gateway.traffic.finished(self.model_dir, len(timing.inter_token) + 1, timing.first_token, tpot)
        elapsed = self.gateway.clock() - self.timings[0].arrival
        metrics.request_finished(model, outcome, elapsed, self.prompt_tokens, self.completion_tokens)


class Gateway:
    """Admits OpenAI requests onto the engines this process hosts (``engines()``: pipeline id ->
    hosted engine) and accounts for them in ``metrics`` (with ``cluster()``: the controller's latest
    ``StatusReply`` or None) and in ``traffic`` (what the monitor learns of arrivals and completions)."""

    def __init__(
        self,
        engines: Callable[[], dict],
        config: GatewayConfig,
        cluster: Callable[[], object] = lambda: None,
        clock: Callable[[], float] = time.perf_counter,
        traffic: TrafficRecorder | None = None,
        scaled_to_zero: Callable[[], set[str]] = set,
    ) -> None:
        self.engines, self.config, self.clock = engines, config, clock
        self.scaled_to_zero = scaled_to_zero
        self.traffic = traffic or TrafficRecorder("gateway")
        self.router = ReplicaRouter(self.replicas)
        self.metrics = GatewayMetrics(engines=self.engine_snapshots, cluster=cluster)

    def replicas(self) -> list[Replica]:
        return [
            Replica(
                pipeline_id,
                model_name(hosted.model_dir),
                hosted.engine is not None and not hosted.unavailable and not hosted.draining,
                hosted.scheduler.max_num_seqs + self.config.max_waiting_requests,
                hosted.unavailable or ("draining: the replica is being removed" if hosted.draining else ""),
            )
            for pipeline_id, hosted in list(self.engines().items())
        ]

    def engine_snapshots(self) -> list[EngineSnapshot]:
        snapshots = []
        for pipeline_id, hosted in list(self.engines().items()):
            free = hosted.allocator.num_free
            snapshots.append(
                EngineSnapshot(
                    model=model_name(hosted.model_dir),
                    pipeline_id=pipeline_id,
                    running=len(hosted.scheduler.running),
                    waiting=len(hosted.scheduler.waiting),
                    kv_blocks_used=hosted.allocator.num_blocks - free,
                    kv_blocks_free=free,
                )
            )
        return snapshots

    def models(self) -> list[dict]:
        """``GET /v1/models``: every model with at least one pipeline here."""
        return [
            {
                "id": model,
                "object": "model",
                "created": 0,
                "owned_by": "flexpipe",
                "pipelines": [r.pipeline_id for r in rs],
            }
            for model, rs in sorted(self.router.models().items())
        ]

    def prepare(self, request: api.SamplingFields, arrival: float | None = None) -> Run:
        """Admit, tokenize and submit ``request`` (arrived at ``arrival``, ``clock`` seconds); raises
        ``BadRequest``, ``ModelNotFound``, ``NotReady`` or ``Overloaded`` before anything runs."""
        arrival = self.clock() if arrival is None else arrival
        api.check_supported(request)
        api.sampling_params(request, api.max_new_tokens(request) or 1, request.seed)  # ranges, before any work
        stops = api.stop_strings(request)
        replica = self._admit(request.model)
        try:
            hosted = self.engines()[replica.pipeline_id]
            prompts = self._prompts(request, hosted)
            generations = self._generations(request, hosted, prompts)
        except BaseException:
            self.router.release(replica)
            raise
        run = Run(self, replica, replica.model, generations, stops, sum(len(p) for p in prompts), arrival)
        self.traffic.arrived(hosted.deployed_model_dir, run.prompt_tokens)
        for generation in generations:
            generation.start()
        return run

    def _admit(self, model: str) -> Replica:
        """The router's choice; a model the policy scaled to zero counts the request as an arrival (so a replica
        starts) and answers ``NotReady`` (503, retry) instead of ``ModelNotFound``."""
        try:
            return self.router.admit(model)
        except ModelNotFound:
            parked = next((d for d in self.scaled_to_zero() if model_name(d) == model), None)
            if parked is None:
                raise
            self.traffic.arrived(parked, 0)
            raise NotReady(f"the model {model!r} is scaled to zero; a replica is starting, retry shortly") from None

    def _prompts(self, request, hosted) -> list[list[int]]:
        requests = hosted.requests
        if isinstance(request, api.ChatCompletionRequest):
            return [chat_prompt(requests.tokenizer, api.chat_messages(request), request.model, requests)]
        prompts = request.prompt
        if isinstance(prompts, list) and prompts and all(isinstance(p, (str, list)) for p in prompts):
            items = prompts
        else:
            items = [prompts]
        if not items:
            raise api.BadRequest("prompt must not be empty", "prompt")
        try:
            return [requests.tokenize(item) for item in items]
        except InvalidRequestError as exc:
            raise api.BadRequest(str(exc), "prompt") from None

    def _generations(self, request, hosted, prompts: list[list[int]]) -> list[Generation]:
        loop = asyncio.get_running_loop()
        context = hosted.requests.max_model_len
        generations = []
        for prompt in prompts:
            wanted = api.max_new_tokens(request)
            if wanted is not None and len(prompt) + wanted > context:
                name = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
                raise api.BadRequest(
                    f"this model's maximum context length is {context} tokens; the request asks for "
                    f"{len(prompt) + wanted} ({len(prompt)} in the prompt, {name}={wanted}); shorten either",
                    name,
                )
            max_tokens = wanted if wanted is not None else context - len(prompt)
            for j in range(request.n):
                seed = None if request.seed is None else request.seed + j
                params = api.sampling_params(request, max_tokens, seed)
                try:
                    generations.append(Generation(hosted, prompt, params, loop))
                except InvalidRequestError as exc:
                    raise api.BadRequest(str(exc)) from None
        return generations


def chat_prompt(tokenizer, messages: list[dict], model: str, requests) -> list[int]:
    """Token ids of ``messages`` rendered by the model's chat template, ready for the assistant's turn."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise api.BadRequest(f"the model {model!r} has no chat template; use /v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja raises its own errors for messages the template rejects
        raise api.BadRequest(f"the chat template rejected the messages: {exc}", "messages") from None
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return requests.tokenize(ids)
    except InvalidRequestError as exc:
        raise api.BadRequest(str(exc), "messages") from None
