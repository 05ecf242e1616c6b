"""The I/O shell around actors: ZeroMQ sockets, decoding, routing, timers and logging.

The shell owns every socket; actors own none. Sockets are plain (non-blocking) pyzmq
sockets; only the wait for the next message or tick is asynchronous. Events arriving on any bound ROUTER
endpoint are validated (``common.wire.decode``), checked for duplicate or out-of-order
command ids, and handed to every hosted actor that accepts their type. Actions come
back as data: ``Send`` goes to a local actor or a known peer, ``Tell`` to a hosted
actor or over a DEALER to the endpoint where that actor runs, ``Log`` to structlog.
Which actors run here and where the others live is configuration only.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

import zmq
import zmq.asyncio

from common import events as ev
from common.logging import emit, get_logger
from common.wire import WireError, decode, encode
from controlplane.actor import Log, Send, Tell, Tick

MAX_DRAIN = 512


@dataclass(frozen=True, slots=True)
class Route:
    """How to answer a peer: the socket its message came in on and its ROUTER identity (None for DEALERs)."""

    socket: zmq.Socket
    identity: bytes | None


class ActorShell:
    """Runs ``actors`` against bound ROUTER sockets until ``stop()``.

    Invariants: actors are called one event at a time, never concurrently; a message
    that fails validation is answered with an ``ErrorReply`` (when its sender can be
    addressed), logged as ``bus.message_rejected`` and reported to the monitor, and
    the shell keeps serving; time reaches actors only through ``Tick`` events.
    """

    def __init__(
        self,
        actors: list,
        routers: list[zmq.Socket],
        *,
        name: str = "controller",
        remote_actors: dict[str, zmq.Socket] | None = None,
        tick_interval_s: float = 0.1,
        clock=time.monotonic,
    ) -> None:
        self.name = name
        self.actors = {actor.name: actor for actor in actors}
        self.routers = routers
        self.remote_actors = remote_actors or {}
        self.tick_interval_s = tick_interval_s
        self.clock = clock
        self.peers: dict[str, Route] = {}
        self.last_cmd_id: dict[tuple[int, bytes | None, str], int] = {}
        self.log = get_logger(process=name)
        self._stopped = asyncio.Event()
        self._local: deque = deque()

    def stop(self) -> None:
        self._stopped.set()

    async def run(self) -> None:
        poller = zmq.asyncio.Poller()
        sockets = [*self.routers, *self.remote_actors.values()]
        for socket in sockets:
            poller.register(socket, zmq.POLLIN)
        next_tick = self.clock()
        while not self._stopped.is_set():
            timeout_ms = max(0, int((next_tick - self.clock()) * 1000))
            ready = dict(await poller.poll(timeout_ms))
            tick_due = self.clock() >= next_tick
            for socket in sockets:
                # before time passes, everything already received is handled: a stalled shell must not
                # see a member as silent while its heartbeats wait in a socket
                if socket in ready or tick_due:
                    self._drain(socket)
            if tick_due:
                now = self.clock()
                self._deliver(Tick(now), now)
                next_tick = now + self.tick_interval_s
            self._run_local()

    def _drain(self, socket: zmq.Socket) -> None:
        is_router = socket.type == zmq.ROUTER
        for _ in range(MAX_DRAIN):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            identity, payload = (frames[0], frames[1:]) if is_router else (None, frames)
            self._on_frames(Route(socket, identity), payload)
            self._run_local()

    def _on_frames(self, route: Route, payload: list[bytes]) -> None:
        now = self.clock()
        peer = repr(route.identity) if route.identity is not None else "remote-actor"
        if len(payload) != 1:
            self._reject(route, WireError("malformed", f"expected one frame, got {len(payload)}"), peer)
            return
        try:
            event = decode(payload[0])
        except WireError as error:
            self._reject(route, error, peer)
            return
        if event.sender:
            self.peers[event.sender] = route
        if isinstance(event, ev.Command) and not self._in_order(route, event):
            return
        if not self._deliver(event, now):
            self._reject(
                route,
                WireError(
                    "unexpected",
                    f"no actor here handles {type(event).__struct_config__.tag!r} events",
                    getattr(event, "cmd_id", -1),
                ),
                event.sender or peer,
            )

    def _in_order(self, route: Route, command: ev.Command) -> bool:
        key = (id(route.socket), route.identity, command.sender)
        last = self.last_cmd_id.get(key)
        if last is not None and command.cmd_id <= last:
            code = "duplicate_command" if command.cmd_id == last else "out_of_order_command"
            self._reject(
                route,
                WireError(code, f"command id {command.cmd_id} after {last} from {command.sender!r}", command.cmd_id),
                command.sender,
            )
            return False
        self.last_cmd_id[key] = command.cmd_id
        return True

    def _reject(self, route: Route, error: WireError, peer: str) -> None:
        emit(self.log, "bus.message_rejected", level="warning", code=error.code, peer=peer, detail=str(error)[:300])
        self._send_to_route(route, error.reply(self.name))
        self._deliver(ev.MessageRejected(sender=self.name, code=error.code, peer=peer), self.clock())

    def _deliver(self, event, now: float) -> bool:
        """Hand ``event`` to every hosted actor that accepts it; False when none does."""
        takers = [a for a in self.actors.values() if isinstance(event, a.accepts)]
        for actor in takers:
            self._local.append((actor, event, now))
        return bool(takers)

    def _run_local(self) -> None:
        while self._local:
            actor, event, now = self._local.popleft()
            try:
                actions = actor.handle(event, now)
            except Exception:  # an actor bug must not take the bus down; it is logged with its traceback
                self.log.exception("actor failed", actor=actor.name, event_type=type(event).__name__)
                continue
            for action in actions:
                self._execute(actor.name, action, now)

    def _execute(self, actor_name: str, action, now: float) -> None:
        if isinstance(action, Log):
            emit(self.log, action.name, level=action.level, actor=actor_name, **action.fields)
        elif isinstance(action, Tell):
            self._tell(action.actor, action.event, now)
        elif isinstance(action, Send):
            if action.peer in self.actors:
                self._local.append((self.actors[action.peer], action.event, now))
            elif action.peer in self.remote_actors:
                self._tell(action.peer, action.event, now)
            elif action.peer in self.peers:
                self._send_to_route(self.peers[action.peer], action.event)
            else:
                self.log.warning("no route to peer", peer=action.peer, event_type=type(action.event).__name__)

    def _tell(self, actor_name: str, event, now: float) -> None:
        if actor_name in self.actors:
            self._local.append((self.actors[actor_name], event, now))
        elif actor_name in self.remote_actors:
            self.remote_actors[actor_name].send(encode(event))
        else:
            self.log.warning("no such actor", target=actor_name, event_type=type(event).__name__)

    def _send_to_route(self, route: Route, event) -> None:
        data = encode(event)
        try:
            if route.identity is None:
                route.socket.send(data, zmq.NOBLOCK)
            else:
                route.socket.send_multipart([route.identity, data], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # a vanished peer or a full queue loses this reply, never the shell
            self.log.warning("reply dropped", error=str(exc), event_type=type(event).__name__)
