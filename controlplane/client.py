"""A peer's connection to a control-bus endpoint: send events, await the reply to a command."""

from __future__ import annotations

import itertools
import os
import time
import uuid

import zmq

from common import events as ev
from common.errors import FlexPipeError
from common.wire import WireError, decode, encode


class BusError(FlexPipeError):
    """The control bus did not answer, or answered with an error."""


def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


class BusClient:
    """A DEALER connected to one ROUTER endpoint, speaking as ``sender``.

    Invariants: command ids increase strictly; ``request`` waits at most ``timeout_s``
    and skips replies to other commands; a TCP endpoint is reached with CURVE unless
    ``insecure`` (which ``check_insecure_endpoint`` allows only on loopback).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        sender: str | None = None,
        key_dir=None,
        insecure: bool = False,
        context: zmq.Context | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.endpoint = endpoint
        self.sender = sender or f"client-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.timeout_s = timeout_s
        self._own_context = context is None
        self._linger_ms = 0
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if is_tcp(endpoint):
            from controlplane import security

            if insecure:
                security.check_insecure_endpoint(endpoint, insecure=True)
            else:
                security.secure_client_socket(self.socket, security.load_keys(key_dir or security.default_key_dir()))
        self.socket.connect(endpoint)
        self._cmd_ids = itertools.count(int(time.time() * 1000))
        self.unsolicited: list[ev.Event] = []

    def next_cmd_id(self) -> int:
        return next(self._cmd_ids)

    def send(self, event: ev.Event) -> None:
        self.socket.send(encode(event))

    def command(self, cls: type[ev.Command], **fields) -> ev.Command:
        return cls(sender=self.sender, cmd_id=self.next_cmd_id(), **fields)

    def request(self, cls: type[ev.Command], timeout_s: float | None = None, **fields) -> ev.Event:
        """Send a ``cls`` command and return its reply; raise BusError on ErrorReply or timeout."""
        command = self.command(cls, **fields)
        self.send(command)
        return self.await_reply(command.cmd_id, timeout_s)

    def request_until_answered(
        self, cls: type[ev.Command], timeout_s: float, keep_trying=lambda: True, **fields
    ) -> ev.Event:
        """``request`` again every 2 s until answered (the controller may still be starting), at most
        ``timeout_s`` and while ``keep_trying()``; raises ``BusError`` then."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.request(cls, timeout_s=2.0, **fields)
            except BusError:
                if time.monotonic() > deadline or not keep_trying():
                    raise

    def await_reply(self, cmd_id: int, timeout_s: float | None = None) -> ev.Event:
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        while True:
            event = self.receive(deadline - time.monotonic())
            if event is None:
                raise BusError(
                    f"no answer from {self.endpoint} within {timeout_s or self.timeout_s:.0f}s "
                    f"(is the controller running? is this peer authorised?)"
                )
            if isinstance(event, ev.Reply) and event.reply_to == cmd_id:
                if isinstance(event, ev.ErrorReply):
                    raise BusError(f"{event.code}: {event.message}")
                return event
            self.unsolicited.append(event)

    def receive(self, timeout_s: float) -> ev.Event | None:
        """The next valid event within ``timeout_s``, or None."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            remaining_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            if not self.socket.poll(remaining_ms):
                return None
            try:
                return decode(self.socket.recv())
            except WireError:
                continue

    def send_last(self, event: ev.Event, linger_s: float = 1.0) -> None:
        """Send ``event`` as this client's last message: closing waits up to ``linger_s`` for it to leave."""
        self.send(event)
        self._linger_ms = int(linger_s * 1000)

    def close(self) -> None:
        self.socket.close(linger=self._linger_ms)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> BusClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def failure_reply(sender: str, command: ev.Command, exc: Exception) -> ev.ErrorReply:
    """The ``ErrorReply`` answering ``command`` that failed with ``exc``: FlexPipe errors by their message,
    anything else by its type too."""
    detail = str(exc) if isinstance(exc, FlexPipeError) else f"{type(exc).__name__}: {exc}"
    return ev.ErrorReply(sender=sender, reply_to=command.cmd_id, code="command_failed", message=detail)


def missing_members(status: ev.StatusReply, worker_ids, host_ids=()) -> set[str]:
    """Which of the named workers and engine hosts are not registered and alive in ``status``."""
    alive = {w.worker_id for w in status.workers if w.state == "alive"}
    alive |= {h.host_id for h in status.engine_hosts if h.state == "alive"}
    return {*worker_ids, *host_ids} - alive


def wait_for_pipeline(
    bus: BusClient,
    pipeline_id: str,
    states: tuple[str, ...],
    timeout_s: float,
    check=lambda: None,
    interval_s: float = 0.2,
) -> ev.PipelineView:
    """Ask for the status every ``interval_s`` until pipeline ``pipeline_id`` is in one of ``states``;
    ``check()`` runs between asks and may raise. Raises ``BusError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        view = next((p for p in bus.request(ev.StatusRequest).pipelines if p.pipeline_id == pipeline_id), None)
        if view is not None and view.state in states:
            return view
        if time.monotonic() > deadline:
            raise BusError(f"pipeline {pipeline_id} is {view.state if view else 'unknown'} after {timeout_s:.0f}s")
        check()
        time.sleep(interval_s)


class Heartbeater:
    """Sends a member's heartbeats (and, optionally, metrics) from its own thread and socket,
    so a long command or a busy serving loop never makes the member look dead.

    Invariants: one ``Heartbeat`` per ``interval_s`` while running; ``metrics()`` (if given)
    is called from this thread and must only read; ``needs_registration`` is set when the
    controller says it does not know the member; ``stop()`` joins the thread.
    """

    def __init__(
        self,
        endpoint: str,
        member_id: str,
        interval_s: float,
        *,
        key_dir=None,
        insecure: bool = False,
        context: zmq.Context | None = None,
        metrics=None,
    ) -> None:
        import threading

        self.member_id, self.interval_s, self.metrics = member_id, interval_s, metrics
        self.client = BusClient(
            endpoint, sender=f"{member_id}.heartbeat", key_dir=key_dir, insecure=insecure, context=context
        )
        self.needs_registration = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"flexpipe-heartbeat-{member_id}", daemon=True)

    def start(self) -> Heartbeater:
        self._thread.start()
        return self

    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            self.client.send(ev.Heartbeat(sender=self.client.sender, worker_id=self.member_id, seq=seq))
            for event in self.metrics() if self.metrics else ():
                self.client.send(event)
            # one wake-up per interval: in a serving process every extra wake-up competes for the GIL
            self._stop.wait(self.interval_s)
            while (reply := self.client.receive(0)) is not None:
                if isinstance(reply, ev.ErrorReply) and reply.code == "not_registered":
                    self.needs_registration.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.client.close()
