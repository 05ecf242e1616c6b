"""The engine loop: feeds micro-batches into the pipeline and turns sampled tokens into results."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import msgspec

from common.errors import PipelineError, RequestFailed
from common.logging import emit, get_logger
from dataplane.engine.scheduler import Scheduler
from dataplane.engine.sequence import Sequence
from dataplane.transport import Inbox, Outbox, messages

log = logging.getLogger("flexpipe.engine")
events = get_logger(component="engine")


@dataclass(slots=True)
class InFlight:
    seqs: list[Sequence]
    launched_at: float


@dataclass(slots=True)
class PauseRequest:
    """Asks the loop to stop launching; ``on_paused()`` runs on the loop thread as it does."""

    on_paused: object
    seal: bool
    done: threading.Event
    result: object = None


class EngineCore:
    """Runs the scheduler against a live pipeline on a background thread.

    Invariants: only the loop thread touches the scheduler and the sockets; callers
    talk to it through ``submit`` (a thread-safe queue) and ``call``. While paused no
    micro-batch is launched; once the in-flight ones are answered the loop parks at an
    iteration boundary until ``resume`` hands it (maybe) a new first stage, epoch and
    stage count, and replies of any other epoch are dropped. A sealed pause sends one
    ``EpochSeal`` behind the last micro-batch it launched, before launching anything else.
    At most ``num_stages`` micro-batches are in flight. Every sequence ends with ``on_finish`` called once:
    finished normally, aborted, failed on its own, or failed because the pipeline died.

    Isolation: a micro-batch that a stage could not serve, or that could not be encoded, is
    retried with each of its sequences alone (``solo``), so only the request it failed for fails;
    a micro-batch unanswered for ``step_timeout_s`` fails its own requests, not the engine.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        to_first_stage: Outbox,
        from_last_stage: Inbox,
        liveness_check,
        epoch: int = 0,
        step_timeout_s: float = 60.0,
    ) -> None:
        self.scheduler = scheduler
        self.to_first_stage = to_first_stage
        self.from_last_stage = from_last_stage
        self.liveness_check = liveness_check
        self.epoch = epoch
        self.step_timeout_s = step_timeout_s
        self.in_flight: dict[int, InFlight] = {}
        self.submissions: queue.SimpleQueue[list[Sequence]] = queue.SimpleQueue()
        self.fatal_error: PipelineError | None = None
        self._next_batch_id = 0
        self._stop = threading.Event()
        self._stop_reason = "the pipeline was closed"
        self._pause = threading.Event()
        self._parked = threading.Event()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._on_parked = None
        self._pause_request: PauseRequest | None = None
        self.parked_result = None
        self.step_seconds = 0.0
        self.replies_in_epoch = 0
        self.num_aborted = 0
        self.num_failed = 0
        self._aborts: queue.SimpleQueue[tuple[list[int], str]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="flexpipe-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences for admission; they join the running batch together."""
        if self.fatal_error is not None:
            for seq in seqs:
                seq.fail(self.fatal_error)
                seq.on_finish(seq)
            return
        self.submissions.put(list(seqs))

    def abort(self, seq_ids, reason: str = "the caller gave up") -> None:
        """Abort requests by seq id (thread-safe, returns at once): each stops before its next step with
        finish reason ``abort``, its KV blocks freed and ``on_finish`` called; unknown or finished ids
        are ignored. Aborts queued while a refactor holds the loop parked apply as it resumes."""
        self._aborts.put((list(seq_ids), reason))
        self._wakeup.set()

    def call(self, fn, timeout_s: float = 30.0):
        """Run ``fn()`` on the loop thread between iterations and return its result."""
        if threading.current_thread() is self.thread:
            return fn()
        done = threading.Event()
        box: list = []
        self._calls.put((fn, box, done))
        self._wakeup.set()
        if not self._wait_on_loop(done, timeout_s):
            raise PipelineError("the engine loop did not run a call in time (stopped or stuck)")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    @property
    def refilled(self) -> bool:
        """Whether the pipeline answered a micro-batch per stage since the last resume, or has nothing to do."""
        return self.replies_in_epoch >= self.scheduler.num_stages or not (self.in_flight or self.scheduler.has_work)

    @property
    def launched(self) -> int:
        """How many micro-batches the engine has launched, over every epoch."""
        return self._next_batch_id

    def begin_pause(self, timeout_s: float, on_paused=None, seal: bool = False, on_parked=None) -> tuple[int, object]:
        """Stop launching without waiting for the drain; returns how many micro-batches were launched
        (the seal's count) and ``on_paused()``, run on the loop thread as the last launch is behind
        it. ``wait_parked`` then waits for the drain, and ``on_parked()`` runs as the loop parks
        (its result in ``parked_result``)."""
        request = PauseRequest(on_paused, seal, threading.Event())
        self._on_parked, self.parked_result = on_parked, None
        self._pause_request = request
        self._pause.set()
        self._wakeup.set()
        if not self._wait_on_loop(request.done, timeout_s):
            self._pause_request = None
            self._pause.clear()
            raise PipelineError(f"the engine loop did not stop launching within {timeout_s:.1f}s (stopped or stuck)")
        if isinstance(request.result, BaseException):
            self._pause.clear()
            raise request.result
        return request.result

    def wait_parked(self, timeout_s: float) -> float:
        """After ``begin_pause``: wait until nothing is in flight; returns when the loop parked (monotonic)."""
        if not self._wait_on_loop(self._parked, timeout_s):
            self._pause.clear()
            raise PipelineError(f"the pipeline did not drain within {timeout_s:.1f}s")
        return time.monotonic()

    def _wait_on_loop(self, event: threading.Event, timeout_s: float) -> bool:
        """Wait for ``event``, set by the loop thread; False once ``timeout_s`` passed or the loop is gone."""
        deadline = time.monotonic() + timeout_s
        while not event.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if not self.thread.is_alive() or time.monotonic() >= deadline:
                return event.is_set()
        return True

    def pause(self, timeout_s: float, on_parked=None) -> float:
        """Stop launching, wait until nothing is in flight; returns when the loop parked (monotonic).
        ``on_parked()`` runs on the loop thread as it parks; its result is left in ``parked_result``."""
        deadline = time.monotonic() + timeout_s
        self.begin_pause(timeout_s, on_parked=on_parked)
        return self.wait_parked(max(0.0, deadline - time.monotonic()))

    def resume(
        self, to_first_stage: Outbox | None = None, epoch: int | None = None, num_stages: int | None = None
    ) -> Outbox:
        """Leave the park, with a new first stage, epoch and stage count if given; returns the
        outbox the engine used before."""
        previous = self.to_first_stage
        if to_first_stage is not None:
            self.to_first_stage, self.epoch, self.scheduler.num_stages = to_first_stage, epoch, num_stages
            self.replies_in_epoch = 0
        self._pause_request = None
        self._parked.clear()
        self._pause.clear()
        self._wakeup.set()
        return previous

    def _run_calls(self) -> None:
        while True:
            try:
                fn, box, done = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                box.append(fn())
            except BaseException as exc:  # handed back to the caller
                box.append(exc)
            done.set()

    def stop(self, timeout_s: float = 10.0, reason: str = "the pipeline was closed") -> None:
        """Stop the loop; every request still pending fails with ``PipelineError(reason)``."""
        self._stop_reason = reason
        self._stop.set()
        self._wakeup.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout_s)

    def _run(self) -> None:
        last_check = time.monotonic()
        try:
            while not self._stop.is_set():
                self._run_calls()
                if self._pause.is_set():
                    self._stop_launching()
                    if not self.in_flight:
                        self._park()
                        continue
                self._admit_submissions()
                self._apply_aborts()
                if not self._pause.is_set():
                    self._launch()
                self._collect(timeout_ms=5 if self.in_flight else 20)
                if time.monotonic() - last_check > 0.2:
                    self._check_health()
                    last_check = time.monotonic()
        except PipelineError as exc:
            self._fail_everything(exc)
        except Exception as exc:  # a bug in the loop must still release every waiting caller
            log.exception("engine loop crashed")
            self._fail_everything(PipelineError(f"engine loop crashed: {type(exc).__name__}: {exc}"))
        else:
            self._fail_everything(PipelineError(self._stop_reason))

    def _stop_launching(self) -> None:
        request, self._pause_request = self._pause_request, None
        if request is None:
            return
        try:
            if request.seal:
                self.to_first_stage.send(messages.encode(messages.EpochSeal(self.epoch, self.launched)))
            request.result = (self.launched, request.on_paused() if request.on_paused is not None else None)
        except Exception as exc:  # handed to the caller of begin_pause
            request.result = exc
        request.done.set()

    def _park(self) -> None:
        if self._on_parked is not None:
            self.parked_result = self._on_parked()
        self._parked.set()
        while self._pause.is_set() and not self._stop.is_set():
            self._wakeup.wait(0.05)
            self._wakeup.clear()
            self._run_calls()
        self._parked.clear()
        # The refilled pipeline serves first the requests that have waited longest since their last token.
        self.scheduler.running.sort(key=lambda seq: seq.token_times[-1] if seq.token_times else 0.0)

    def _admit_submissions(self) -> None:
        while True:
            try:
                for seq in self.submissions.get_nowait():
                    self.scheduler.add(seq)
            except queue.Empty:
                return

    def _apply_aborts(self) -> None:
        while True:
            try:
                seq_ids, reason = self._aborts.get_nowait()
            except queue.Empty:
                return
            for seq_id in seq_ids:
                seq = self.scheduler.find(seq_id)
                if seq is None or seq.finished:
                    continue
                seq.abort()
                self.num_aborted += 1
                emit(events, "request.aborted", seq_id=seq_id, reason=reason, output_tokens=len(seq.output_token_ids))
                self._finish(seq)

    def _launch(self) -> None:
        while len(self.in_flight) < self.scheduler.num_stages:
            scheduled = self.scheduler.next_micro_batch()
            if not scheduled:
                return
            seqs = [seq for seq, _ in scheduled]
            batch_id = self._next_batch_id
            header = messages.MicroBatch(batch_id, self.epoch, [work for _, work in scheduled])
            try:
                data = messages.encode(header)
            except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
                self._on_failed_batch(seqs, f"the request cannot be encoded for the pipeline: {exc}")
                continue
            self._next_batch_id += 1
            self.in_flight[batch_id] = InFlight(seqs, time.monotonic())
            self.to_first_stage.send(data)

    def _on_failed_batch(self, seqs: list[Sequence], reason: str) -> None:
        """A micro-batch failed: its only request fails; with several, each goes again alone."""
        live = [seq for seq in seqs if not seq.finished]
        if len(seqs) == 1 and live:
            self._fail_one(live[0], reason)
            return
        log.warning("micro-batch of %d requests failed (%s); retrying each alone", len(seqs), reason)
        for seq in live:
            seq.retry()
            seq.solo = True

    def _fail_one(self, seq: Sequence, reason: str) -> None:
        self.num_failed += 1
        emit(events, "request.failed", level="warning", seq_id=seq.seq_id, error=reason)
        seq.fail(RequestFailed(f"request {seq.seq_id} failed: {reason}"))
        self._finish(seq)

    def _collect(self, timeout_ms: int) -> None:
        message = self.from_last_stage.recv(timeout_ms)
        while message is not None:
            self._on_message(message.header)
            message = self.from_last_stage.recv(0)

    def _on_message(self, data: bytes) -> None:
        try:
            reply = messages.decode(data)
        except msgspec.DecodeError as exc:
            log.error("dropping malformed message from the last stage: %s", exc)
            return
        if isinstance(reply, messages.SampledTokens) and reply.epoch != self.epoch:
            log.error("dropping a reply of epoch %s while serving epoch %s", reply.epoch, self.epoch)
            return
        flight = self.in_flight.pop(reply.batch_id, None)
        if flight is None:
            log.error("dropping reply for unknown micro-batch %s", reply.batch_id)
            return
        took = time.monotonic() - flight.launched_at
        self.step_seconds = took if not self.step_seconds else 0.8 * self.step_seconds + 0.2 * took
        if isinstance(reply, messages.StageFailure):
            self._on_failed_batch(flight.seqs, f"stage {reply.stage} could not serve it: {reply.message}")
            return
        self.replies_in_epoch += 1
        logprobs = reply.logprobs or [None] * len(reply.token_ids)
        for seq, token, logprob in zip(flight.seqs, reply.token_ids, logprobs):
            if seq.finished:
                continue  # aborted while its micro-batch was in flight
            seq.solo = False
            failure = reply.failures.get(seq.seq_id)
            if failure is not None:
                self._fail_one(seq, failure)
            elif seq.chunk_in_flight:
                seq.chunk_done()
            else:
                seq.append_token(token, logprob)
                if seq.on_token is not None:
                    seq.on_token(seq)
                if seq.finished:
                    self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if seq.on_finish is not None:
            seq.on_finish(seq)

    def _check_health(self) -> None:
        self.liveness_check()
        now = time.monotonic()
        late = [batch for batch, flight in self.in_flight.items() if now - flight.launched_at > self.step_timeout_s]
        for batch_id in late:
            for seq in self.in_flight.pop(batch_id).seqs:
                if not seq.finished:
                    self._fail_one(seq, f"micro-batch {batch_id} got no answer within {self.step_timeout_s:.0f}s")

    def _fail_everything(self, error: PipelineError) -> None:
        self.fatal_error = error
        self._admit_submissions()
        doomed = {id(s): s for f in self.in_flight.values() for s in f.seqs}
        doomed.update({id(s): s for s in [*self.scheduler.running, *self.scheduler.waiting]})
        self.in_flight.clear()
        for seq in doomed.values():
            if not seq.finished:
                seq.fail(error)
                self._finish(seq)
