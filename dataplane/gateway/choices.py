"""A choice's steps as text deltas: detokenized whole characters, stop strings cut, timings observed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from common.errors import RequestFailed
from dataplane.gateway.generation import Generation
from dataplane.gateway.text import IncrementalDetokenizer, StopStrings


@dataclass(slots=True)
class TokenLogprob:
    """One output token's log-probability (natural log) and its ``top`` alternatives, by token id."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclass(slots=True)
class ChoiceDelta:
    """What one choice adds to a response: text, its tokens, and the finish reason on the last delta
    (``stop``: end of sequence, stop token or stop string; ``length``: ``max_tokens`` or the context)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(slots=True)
class Timing:
    """Per-request timings for the metrics, in seconds from ``arrival`` (``time.perf_counter``)."""

    arrival: float
    first_token: float | None = None
    inter_token: list[float] = field(default_factory=list)
    last_token: float | None = None

    def observe(self, times: list[float]) -> None:
        """Account for tokens that arrived at ``times``."""
        for at in times:
            if self.last_token is None:
                self.first_token = at - self.arrival
            else:
                self.inter_token.append(at - self.last_token)
            self.last_token = at


async def choice_deltas(
    index: int, generation: Generation, tokenizer, stops: list[str], timing: Timing
) -> AsyncIterator[ChoiceDelta]:
    """Deltas of one choice until it finishes; raises ``RequestFailed`` when the engine failed it."""
    detokenizer = IncrementalDetokenizer(tokenizer, generation.seq.prompt_token_ids)
    matcher = StopStrings(stops)
    async for step in generation.steps():
        if step.error is not None or step.finish_reason in ("error", "abort"):
            raise RequestFailed(str(step.error or "the request was aborted"))
        timing.observe(step.times)
        text = detokenizer.add(step.token_ids)
        if step.finish_reason is not None:
            text += detokenizer.flush()
        released, stopped = matcher.feed(text)
        logprobs = [
            TokenLogprob(t, lp.logprob, dict(zip(lp.top_ids, lp.top_logprobs)))
            for t, lp in zip(step.token_ids, step.logprobs)
        ]
        if stopped:
            generation.cancel("a stop string was generated")
            yield ChoiceDelta(index, released, step.token_ids, logprobs, "stop")
            return
        if step.finish_reason is not None:
            yield ChoiceDelta(index, released + matcher.flush(), step.token_ids, logprobs, step.finish_reason)
            return
        yield ChoiceDelta(index, released, step.token_ids, logprobs)


async def interleave(streams: list[AsyncIterator[ChoiceDelta]]) -> AsyncIterator[ChoiceDelta]:
    """Deltas of several choices in the order they arrive; the first error is raised once all stop."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield delta
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[ChoiceDelta]) -> None:
        try:
            async for delta in stream:
                await queue.put(delta)
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put(exc)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
