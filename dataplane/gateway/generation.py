"""One choice generating on an engine, seen from the HTTP event loop.

The engine calls back on its own thread; each callback copies what is new and hands it to the event
loop with ``call_soon_threadsafe``, so the request handler only ever awaits a queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from dataplane.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class Step:
    """Tokens a choice gained since the last step, each stamped when the engine thread got it
    (``times``, ``time.perf_counter`` seconds); the last step has ``finish_reason`` (``stop``,
    ``length``, ``abort``, ``error``)."""

    token_ids: list[int]
    logprobs: list = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None

    def absorb(self, later: Step) -> None:
        """Take ``later``'s tokens and ending as this step's own."""
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        self.times += later.times
        self.finish_reason, self.error = later.finish_reason, later.error


class Generation:
    """A sequence submitted to ``hosted``'s engine. Invariant: exactly one step with a finish reason is
    delivered; ``cancel`` after that is a no-op."""

    def __init__(
        self, hosted, prompt_token_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.hosted, self.loop = hosted, loop
        self.queue: asyncio.Queue[Step] = asyncio.Queue()
        self.sent = 0
        self.done = False
        self.seq = hosted.requests.new_sequence(prompt_token_ids, params, self._on_finish, on_token=self._on_token)

    def start(self) -> None:
        self.hosted.engine.submit([self.seq])

    async def steps(self) -> AsyncIterator[Step]:
        """Steps as they come; when a reader falls behind, the steps waiting are merged into one, so a
        slow client gets fewer, larger events instead of a growing backlog."""
        while True:
            step = await self.queue.get()
            while step.finish_reason is None and not self.queue.empty():
                step.absorb(self.queue.get_nowait())
            if step.finish_reason is not None:
                self.done = True
            yield step
            if self.done:
                return

    def cancel(self, reason: str) -> None:
        """Abort the sequence in the engine (its KV blocks are freed); returns at once."""
        if not self.done and self.hosted.engine is not None:
            self.hosted.engine.abort([self.seq.seq_id], reason=reason)

    def _on_token(self, seq) -> None:
        if not seq.finished:  # the finishing token travels with the last step
            self._deliver(self._new_step(seq))

    def _on_finish(self, seq) -> None:
        step = self._new_step(seq)
        step.finish_reason, step.error = seq.finish_reason or "error", seq.error
        self._deliver(step)

    def _new_step(self, seq) -> Step:
        start, self.sent = self.sent, len(seq.output_token_ids)
        logprobs = seq.logprobs[start : self.sent] if seq.params.logprobs is not None else []
        new = seq.output_token_ids[start : self.sent]
        return Step(new, logprobs, [time.perf_counter()] * len(new))

    def _deliver(self, step: Step) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, step)
        except RuntimeError:  # the event loop is closed: the gateway is shutting down
            pass
