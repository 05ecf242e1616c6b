"""The engine host process: one engine per deployed pipeline, and the request endpoint clients use.

Run as ``python -m dataplane.engine.host --controller ENDPOINT --host-id ID``. It
registers with the controller, prepares/starts/stops engines on the coordinator's
commands, pauses and resumes them (maybe on a new first stage and epoch) while a
pipeline is refactored, and serves ``GenerateRequest``s on its own ROUTER endpoint, streaming ``TokenChunk`` replies
as tokens arrive. The gateway (``dataplane.gateway``) runs one in its process and serves the same
engines over HTTP; it is told how each refactor of its pipelines ended (``RefactorOutcome``).
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import socket as pysocket
import sys
import time
from pathlib import Path
from typing import Callable

import zmq

from common import events as ev
from common.config import load_config
from common.errors import FlexPipeError, PipelineError
from common.logging import configure_logging, emit, get_logger
from common.model.spec import ModelSpec
from common.runtime import freeze_heap, new_session_dir, notify_systemd, runtime_dir
from controlplane.client import BusClient, Heartbeater, failure_reply
from dataplane.engine.core import EngineCore
from dataplane.engine.kv_blocks import BlockAllocator
from dataplane.engine.requests import RequestFactory, load_tokenizer
from dataplane.engine.sampling_params import SamplingParams
from dataplane.engine.scheduler import Scheduler
from dataplane.transport import Inbox, inbox_address, open_outbox

STREAMING_POLL_MS = 5
IDLE_POLL_MS = 100
MAX_PAUSE_S = 30.0  # a PauseEngine holds this host's loop at most this long


class HostedEngine:
    """One pipeline's engine. Invariants: requests are accepted only while it is started and not
    degraded (while paused they wait in the scheduler); a pause waits a bounded time and, when
    the pipeline does not drain in it, leaves the engine serving; resuming at a new epoch
    needs a newer epoch than the one served and, after a sealed pause, waits (bounded) for
    the drain first."""

    def __init__(self, context: zmq.Context, command: ev.PrepareEngine, session_dir: Path) -> None:
        self.pipeline_id, self.epoch = command.pipeline_id, command.epoch
        self.context = context
        self.model_dir = Path(command.model_dir)
        self.deployed_model_dir = command.model_dir  # as the controller names the model (traffic reports)
        self.draining = False
        spec = ModelSpec.from_dir(self.model_dir)
        self.requests = RequestFactory(
            spec, load_tokenizer(self.model_dir), command.max_model_len, command.block_size, command.num_kv_blocks
        )
        self.inbox = Inbox(context, inbox_address(command.transport, str(session_dir), f"engine-{command.pipeline_id}"))
        self.allocator = BlockAllocator(command.num_kv_blocks, command.block_size)
        self.scheduler = Scheduler(
            self.allocator, command.num_stages, command.max_num_seqs, command.max_num_batched_tokens
        )
        self.step_timeout_s = command.step_timeout_s
        self.engine: EngineCore | None = None
        self.to_first = None
        self.paused = False
        self.paused_at = 0.0
        self.unavailable = "not started"

    def start(self, first_stage_address: str) -> None:
        self.to_first = open_outbox("tcp", self.context, first_stage_address)
        self.engine = EngineCore(
            self.scheduler,
            self.to_first,
            self.inbox,
            lambda: None,
            epoch=self.epoch,
            step_timeout_s=self.step_timeout_s,
        )
        self.engine.start()
        self.unavailable = ""

    def pause(self, timeout_s: float, seal: bool = False) -> tuple[list[tuple[int, list[int], int]], int]:
        """Park the engine with nothing in flight, waiting at most ``timeout_s``; returns each running
        request's (id, block table, positions with KV written) and -1. Sealed, it returns once
        launching stopped, with the positions in-flight micro-batches write and the seal's count;
        as the pipeline drains, the requests holding KV are counted (``requests_carried``)."""
        if self.engine is None:
            raise PipelineError(f"the engine of pipeline {self.pipeline_id} is not started")
        if self.paused:
            raise PipelineError(f"the engine of pipeline {self.pipeline_id} is paused already")
        engine = self.engine
        self.paused_at = time.monotonic()
        try:
            if seal:
                launched, running = engine.begin_pause(
                    timeout_s,
                    seal=True,
                    on_paused=lambda: self.scheduler.kv_in_use(in_flight=True),
                    on_parked=lambda: len(self.scheduler.kv_in_use()),
                )
            else:
                engine.pause(timeout_s, on_parked=self.scheduler.kv_in_use)
                launched, running = -1, engine.parked_result
        except PipelineError as exc:
            raise PipelineError(f"pipeline {self.pipeline_id} could not pause: {exc}; it keeps serving") from exc
        self.paused = True
        return running, launched

    def resume(self, epoch: int, first_stage_address: str, num_stages: int) -> ev.SwitchTiming:
        """Leave the pause; with an address, feed that stage at ``epoch`` with ``num_stages`` stages, once
        the old epoch drained (bounded). Returns the switch as measured here (``stall_s`` is engine idle
        time: drained pipeline to resume)."""
        if not self.paused:
            raise PipelineError(f"the engine of pipeline {self.pipeline_id} is not paused")
        if not first_stage_address:
            self.engine.resume()
            self.paused = False
            return ev.SwitchTiming()
        if epoch <= self.epoch:
            raise PipelineError(
                f"ResumeEngine for epoch {epoch} of pipeline {self.pipeline_id} is stale: "
                f"the engine serves epoch {self.epoch}"
            )
        if num_stages < 1:
            raise PipelineError(f"ResumeEngine for pipeline {self.pipeline_id} needs num_stages >= 1")
        parked_at = self.engine.wait_parked(MAX_PAUSE_S)  # no reply of the old epoch may be left on the way
        carried = self.engine.parked_result
        outbox = open_outbox("tcp", self.context, first_stage_address)
        previous = self.engine.resume(outbox, epoch, num_stages)
        resumed_at = time.monotonic()
        previous.close()
        self.to_first, self.epoch, self.paused = outbox, epoch, False
        return ev.SwitchTiming(
            stall_s=resumed_at - parked_at,
            switch_s=resumed_at - self.paused_at,
            paused_at=self.paused_at,
            resumed_at=resumed_at,
            requests_carried=carried if isinstance(carried, int) else 0,
        )

    def kv_tokens(self) -> int:
        """Positions with KV written, summed over running requests (read from another thread: an estimate)."""
        return sum(written for _, _, written in self.scheduler.kv_in_use())

    def fail_all(self, reason: str) -> None:
        self.unavailable = reason
        if self.engine is not None:
            self.engine.stop(reason=reason)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        for endpoint in (self.to_first, self.inbox):
            if endpoint is not None:
                endpoint.close()


class EngineHost:
    """Hosts engines and streams generated tokens to clients.

    Invariants: only the main thread touches sockets; engine threads hand finished
    tokens over through ``outgoing``; every GenerateRequest is answered with token
    chunks ending in one with ``finish_reason`` set, or with an ``ErrorReply``.
    """

    def __init__(
        self,
        bus: BusClient,
        host_id: str,
        request_endpoint: str,
        key_dir=None,
        insecure: bool = False,
        http_address: str = "",
        on_refactor_outcome: Callable[[ev.RefactorOutcome], None] | None = None,
        traffic: Callable[[], list[ev.Event]] | None = None,
    ) -> None:
        self.bus, self.host_id = bus, host_id
        self.http_address = http_address
        self.on_refactor_outcome = on_refactor_outcome
        self.traffic = traffic
        self.scaled_to_zero: set[str] = set()  # model dirs whose last replica the policy drained
        self.key_dir, self.insecure = key_dir, insecure
        self.context = bus.context
        self.requests_socket = self.context.socket(zmq.ROUTER)
        self.requests_socket.setsockopt(zmq.LINGER, 0)
        self.requests_socket.bind(request_endpoint)
        self.request_endpoint = request_endpoint
        self.session_dir = new_session_dir(f"engine-{host_id}-")
        self.engines: dict[str, HostedEngine] = {}
        self.outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self.refill_waits: list[tuple[ev.AwaitRefill, float]] = []
        self.open_streams: dict[tuple[bytes, int], tuple[str, int]] = {}
        self.heartbeat_interval_s = 1.0
        self.log = get_logger(host_id=host_id)
        self.heartbeater: Heartbeater | None = None
        self._running = True

    def stop(self, *_args) -> None:
        self._running = False

    def register(self, timeout_s: float = 60.0) -> None:
        self.bus.request_until_answered(
            ev.RegisterEngineHost,
            timeout_s,
            lambda: self._running,
            host_id=self.host_id,
            host=pysocket.gethostname(),
            pid=os.getpid(),
            request_address=self.request_endpoint,
            http_address=self.http_address,
        )

    def run(self, notify: bool = True) -> None:
        """Serve until ``stop()``; ``notify`` tells systemd once ready (a service, not an embedded host)."""
        self.register()
        self.heartbeater = Heartbeater(
            self.bus.endpoint,
            self.host_id,
            self.heartbeat_interval_s,
            key_dir=self.key_dir,
            insecure=self.insecure,
            context=self.context,
            metrics=self._metrics,
        ).start()
        emit(self.log, "process.ready", request_address=self.request_endpoint)
        if notify:
            freeze_heap()
            notify_systemd()
        poller = zmq.Poller()
        poller.register(self.bus.socket, zmq.POLLIN)
        poller.register(self.requests_socket, zmq.POLLIN)
        while self._running:
            if self.heartbeater.needs_registration.is_set():
                self.heartbeater.needs_registration.clear()
                self.register()
            ready = dict(poller.poll(self._poll_ms()))
            if self.bus.socket in ready:
                while (event := self.bus.receive(0)) is not None:
                    self._on_command(event)
            if self.requests_socket in ready:
                self._drain_requests()
            self._flush_outgoing()
            if self.refill_waits:
                self._answer_refilled()
        self.close()

    def _poll_ms(self) -> int:
        """Short waits while tokens stream or a refill is awaited; otherwise wake only for messages, so an
        engine sharing this process (the offline ``LLM``) is not interrupted for nothing."""
        busy = self.open_streams or self.refill_waits or not self.outgoing.empty()
        return STREAMING_POLL_MS if busy else IDLE_POLL_MS

    def _metrics(self) -> list[ev.Event]:
        events = []
        for hosted in list(self.engines.values()):
            free = hosted.allocator.num_free
            events.append(
                ev.EngineMetrics(
                    sender=f"{self.host_id}.heartbeat",
                    host_id=self.host_id,
                    pipeline_id=hosted.pipeline_id,
                    epoch=hosted.epoch,
                    running=len(hosted.scheduler.running),
                    waiting=len(hosted.scheduler.waiting),
                    kv_blocks_used=hosted.allocator.num_blocks - free,
                    kv_blocks_free=free,
                    tokens_per_s=0.0,
                    kv_tokens=hosted.kv_tokens(),
                    step_s=hosted.engine.step_seconds if hosted.engine else 0.0,
                    requests_aborted=hosted.engine.num_aborted if hosted.engine else 0,
                    requests_failed=hosted.engine.num_failed if hosted.engine else 0,
                )
            )
        return events + (self.traffic() if self.traffic is not None else [])

    def _on_command(self, event) -> None:
        if isinstance(event, ev.RefactorOutcome):
            if self.on_refactor_outcome is not None:
                self.on_refactor_outcome(event)
            return
        if isinstance(event, ev.PipelineStateChanged):
            hosted = self.engines.get(event.pipeline_id)
            if hosted is not None and event.state == "DEGRADED":
                hosted.fail_all(f"pipeline {event.pipeline_id} is degraded: {event.reason}")
            return
        handler = {
            ev.PrepareEngine: self._prepare,
            ev.StartEngine: self._start,
            ev.StopEngine: self._stop,
            ev.PauseEngine: self._pause,
            ev.ResumeEngine: self._resume,
            ev.SnapshotKv: self._snapshot,
            ev.AwaitRefill: self._await_refill,
            ev.DrainPipeline: self._drain,
        }.get(type(event))
        if handler is None:
            return
        try:
            reply = handler(event)
        except Exception as exc:  # every command gets an answer, failures included
            reply = failure_reply(self.host_id, event, exc)
        if reply is not None:
            self.bus.send(reply)

    def _prepare(self, command: ev.PrepareEngine) -> ev.EnginePrepared:
        old = self.engines.pop(command.pipeline_id, None)
        if old is not None:
            old.close()
        hosted = HostedEngine(self.context, command, self.session_dir)
        self.engines[command.pipeline_id] = hosted
        self.scaled_to_zero.discard(command.model_dir)
        return ev.EnginePrepared(
            sender=self.host_id,
            reply_to=command.cmd_id,
            pipeline_id=command.pipeline_id,
            inbox_address=hosted.inbox.address,
        )

    def _start(self, command: ev.StartEngine) -> ev.Ack:
        hosted = self.engines.get(command.pipeline_id)
        if hosted is None:
            raise FlexPipeError(f"no engine prepared for pipeline {command.pipeline_id}")
        hosted.start(command.first_stage_address)
        emit(self.log, "engine.started", pipeline_id=command.pipeline_id, epoch=command.epoch)
        return ev.Ack(sender=self.host_id, reply_to=command.cmd_id)

    def _pause(self, command: ev.PauseEngine) -> ev.EnginePaused:
        hosted = self._hosted(command.pipeline_id)
        started = time.monotonic()
        running, launched = hosted.pause(min(max(0.0, command.timeout_s), MAX_PAUSE_S), command.seal)
        emit(
            self.log,
            "engine.paused",
            pipeline_id=command.pipeline_id,
            epoch=hosted.epoch,
            running=len(running),
            seconds=round(time.monotonic() - started, 4),
        )
        return ev.EnginePaused(
            sender=self.host_id,
            reply_to=command.cmd_id,
            pipeline_id=command.pipeline_id,
            epoch=hosted.epoch,
            seq_ids=[r[0] for r in running],
            block_tables=[r[1] for r in running],
            num_computed=[r[2] for r in running],
            launched=launched,
        )

    def _snapshot(self, command: ev.SnapshotKv) -> ev.KvSnapshot:
        hosted = self._hosted(command.pipeline_id)
        if hosted.engine is None:
            raise PipelineError(f"the engine of pipeline {command.pipeline_id} is not started")
        running = hosted.engine.call(hosted.scheduler.kv_in_use, timeout_s=10.0)
        return ev.KvSnapshot(
            sender=self.host_id,
            reply_to=command.cmd_id,
            pipeline_id=command.pipeline_id,
            epoch=hosted.epoch,
            seq_ids=[r[0] for r in running],
            block_tables=[r[1] for r in running],
            num_computed=[r[2] for r in running],
        )

    def _resume(self, command: ev.ResumeEngine) -> ev.EngineResumed:
        hosted = self._hosted(command.pipeline_id)
        timing = hosted.resume(command.epoch, command.first_stage_address, command.num_stages)
        emit(
            self.log,
            "engine.resumed",
            pipeline_id=command.pipeline_id,
            epoch=hosted.epoch,
            stall_s=timing.stall_s,
            switch_s=timing.switch_s,
        )
        return ev.EngineResumed(
            sender=self.host_id,
            reply_to=command.cmd_id,
            pipeline_id=command.pipeline_id,
            epoch=hosted.epoch,
            switch=timing,
        )

    def _await_refill(self, command: ev.AwaitRefill) -> None:
        self._hosted(command.pipeline_id)
        self.refill_waits.append((command, time.monotonic() + max(0.0, command.timeout_s)))

    def _answer_refilled(self) -> None:
        now, waiting = time.monotonic(), []
        for command, deadline in self.refill_waits:
            hosted = self.engines.get(command.pipeline_id)
            if hosted is None or hosted.engine is None or hosted.engine.refilled or now >= deadline:
                self.bus.send(ev.Ack(sender=self.host_id, reply_to=command.cmd_id))
            else:
                waiting.append((command, deadline))
        self.refill_waits = waiting

    def _drain(self, command: ev.DrainPipeline) -> ev.Ack:
        """New requests go to the model's other replicas from now on; those admitted here finish."""
        hosted = self._hosted(command.pipeline_id)
        hosted.draining = True
        if command.last:
            self.scaled_to_zero.add(hosted.deployed_model_dir)
        emit(self.log, "engine.draining", pipeline_id=command.pipeline_id, last=command.last)
        return ev.Ack(sender=self.host_id, reply_to=command.cmd_id)

    def _hosted(self, pipeline_id: str) -> HostedEngine:
        hosted = self.engines.get(pipeline_id)
        if hosted is None:
            raise PipelineError(f"no engine of pipeline {pipeline_id!r} on {self.host_id}")
        return hosted

    def _stop(self, command: ev.StopEngine) -> ev.Ack:
        hosted = self.engines.pop(command.pipeline_id, None)
        if hosted is not None:
            hosted.close()
            emit(self.log, "engine.stopped", pipeline_id=command.pipeline_id)
        return ev.Ack(sender=self.host_id, reply_to=command.cmd_id)

    def _drain_requests(self) -> None:
        while True:
            try:
                identity, data = self.requests_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            self._on_request(identity, data)

    def _on_request(self, identity: bytes, data: bytes) -> None:
        from common.wire import WireError, decode, encode

        try:
            request = decode(data)
            if isinstance(request, ev.CancelGenerate):
                self._cancel(identity, request)
                return
            if not isinstance(request, ev.GenerateRequest):
                raise WireError(
                    "unexpected", "this endpoint takes generate requests only", getattr(request, "cmd_id", -1)
                )
        except WireError as error:
            emit(self.log, "bus.message_rejected", level="warning", code=error.code, detail=str(error)[:200])
            self.requests_socket.send_multipart([identity, encode(error.reply(self.host_id))])
            return
        try:
            seq = self._submit(identity, request)
        except FlexPipeError as exc:
            reply = ev.ErrorReply(
                sender=self.host_id, reply_to=request.cmd_id, code="request_refused", message=str(exc)
            )
            self.requests_socket.send_multipart([identity, encode(reply)])
            return
        emit(
            self.log,
            "request.started",
            pipeline_id=request.pipeline_id,
            seq_id=seq.seq_id,
            prompt_tokens=len(seq.prompt_token_ids),
            max_tokens=request.max_tokens,
        )

    def _cancel(self, identity: bytes, request: ev.CancelGenerate) -> None:
        stream = self.open_streams.get((identity, request.request_id))
        hosted = self.engines.get(stream[0]) if stream is not None else None
        if hosted is not None and hosted.engine is not None:
            hosted.engine.abort([stream[1]], reason="the client cancelled it")

    def _submit(self, identity: bytes, request: ev.GenerateRequest):
        hosted = self.engines.get(request.pipeline_id)
        if hosted is None:
            raise PipelineError(f"no pipeline {request.pipeline_id!r} on this engine host")
        if hosted.unavailable:
            raise PipelineError(f"pipeline {request.pipeline_id!r} is unavailable: {hosted.unavailable}")
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
        )
        prompt = request.prompt_token_ids or request.prompt
        tokens = hosted.requests.tokenize(prompt)
        sent = [0]

        def on_token(seq) -> None:
            if seq.finished:
                return  # the final chunk carries it
            new = seq.output_token_ids[sent[0] :]
            sent[0] = len(seq.output_token_ids)
            self.outgoing.put((identity, ev.TokenChunk(sender=self.host_id, reply_to=request.cmd_id, token_ids=new)))

        def on_finish(seq) -> None:
            new = seq.output_token_ids[sent[0] :]
            if seq.error is not None:
                reply = ev.ErrorReply(
                    sender=self.host_id, reply_to=request.cmd_id, code="request_failed", message=str(seq.error)
                )
            else:
                reply = ev.TokenChunk(
                    sender=self.host_id,
                    reply_to=request.cmd_id,
                    token_ids=new,
                    text=hosted.requests.decode(seq.output_token_ids),
                    finish_reason=seq.finish_reason,
                    prompt_tokens=len(seq.prompt_token_ids),
                    completion_tokens=len(seq.output_token_ids),
                )
            self.outgoing.put((identity, reply))
            self.open_streams.pop((identity, request.cmd_id), None)

        seq = hosted.requests.new_sequence(tokens, params, on_finish, on_token=on_token)
        self.open_streams[(identity, request.cmd_id)] = (request.pipeline_id, seq.seq_id)
        hosted.engine.submit([seq])
        return seq

    def _flush_outgoing(self) -> None:
        from common.wire import encode

        while True:
            try:
                identity, event = self.outgoing.get_nowait()
            except queue.Empty:
                return
            try:
                self.requests_socket.send_multipart([identity, encode(event)], zmq.NOBLOCK)
            except zmq.ZMQError:
                continue

    def close(self) -> None:
        if self.heartbeater is not None:
            self.heartbeater.stop()
        for hosted in self.engines.values():
            hosted.close()
        self.engines.clear()
        self.requests_socket.close(linger=0)
        if self.request_endpoint.startswith("ipc://"):
            Path(self.request_endpoint[len("ipc://") :]).unlink(missing_ok=True)
        self.bus.close()
        shutil.rmtree(self.session_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FlexPipe engine host")
    parser.add_argument("--config", help="FlexPipe TOML configuration")
    parser.add_argument("--controller", help="controller endpoint (default: from the configuration)")
    parser.add_argument("--host-id", default="engine-0")
    parser.add_argument(
        "--request-endpoint", help="where clients send generate requests (default: ipc in the runtime dir)"
    )
    parser.add_argument("--insecure", action="store_true", help="plain TCP to a loopback controller")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    configure_logging("engine_host")
    endpoint = args.request_endpoint or f"ipc://{runtime_dir()}/requests-{args.host_id}.sock"
    bus = BusClient(
        args.controller or config.controller.ipc_endpoint,
        sender=args.host_id,
        key_dir=config.security.key_path,
        insecure=args.insecure or config.security.insecure,
    )
    host = EngineHost(bus, args.host_id, endpoint, config.security.key_path, args.insecure or config.security.insecure)
    signal.signal(signal.SIGTERM, host.stop)
    signal.signal(signal.SIGINT, host.stop)
    try:
        host.run()
    except FlexPipeError as exc:
        print(f"flexpipe engine host {args.host_id}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
