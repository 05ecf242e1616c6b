"""Real cluster workers and an engine host, registered with a controller the test plays itself.

The real controller hands every event to its actors and no actor lets a peer address a
worker directly (the coordinator owns stage placement), so tests that drive workers
command by command bind the controller's ROUTER themselves and speak the wire to them.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import zmq

from common import events as ev
from common.runtime import remove_rings_of
from common.wire import decode, encode

REPO = Path(__file__).resolve().parents[2]
HEARTBEAT_S = 0.5


class CommandRefused(AssertionError):
    """A peer answered a command with an ``ErrorReply``."""


class StandInController:
    """The controller's ROUTER, with the test as the coordinator.

    Invariants: registrations are answered, heartbeats and metrics are dropped, every other
    event is kept in ``events`` in arrival order; every wait is bounded.
    """

    def __init__(self, runtime: Path) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"ipc://{runtime}/controller.sock"
        self.socket.bind(self.endpoint)
        self.routes: dict[str, bytes] = {}
        self.events: list[ev.Event] = []
        self.engine_metrics: list[ev.EngineMetrics] = []
        self._cmd_ids = itertools.count(1)

    def _receive(self, timeout_s: float) -> ev.Event | None:
        if not self.socket.poll(int(max(0.0, timeout_s) * 1000)):
            return None
        identity, data = self.socket.recv_multipart()
        event = decode(data)
        self.routes[event.sender] = identity
        if isinstance(event, ev.RegisterWorker):
            self._answer(
                event.sender,
                ev.WorkerRegistered(sender="controller", reply_to=event.cmd_id, heartbeat_interval_s=HEARTBEAT_S),
            )
        elif isinstance(event, ev.RegisterEngineHost):
            self._answer(event.sender, ev.Ack(sender="controller", reply_to=event.cmd_id))
        elif isinstance(event, ev.EngineMetrics):
            self.engine_metrics.append(event)
        elif not isinstance(event, (ev.Heartbeat, ev.WorkerMetrics)):
            self.events.append(event)
            return event
        return None

    def _answer(self, peer: str, event: ev.Event) -> None:
        self.socket.send_multipart([self.routes[peer], encode(event)])

    def wait_engine_metrics(self, condition, timeout_s: float = 10.0) -> ev.EngineMetrics:
        """The first engine metrics report, from now on, that satisfies ``condition``."""
        seen = len(self.engine_metrics)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._receive(0.1)
            for report in self.engine_metrics[seen:]:
                if condition(report):
                    return report
            seen = len(self.engine_metrics)
        raise AssertionError(f"no engine metrics satisfied the condition within {timeout_s}s")

    def wait_registered(self, peers: list[str], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not set(peers) <= set(self.routes):
            assert time.monotonic() < deadline, f"not registered: {sorted(set(peers) - set(self.routes))}"
            self._receive(0.1)

    def send(self, peer: str, cls: type[ev.Command], **fields) -> ev.Command:
        command = cls(sender="controller", cmd_id=next(self._cmd_ids), **fields)
        self._answer(peer, command)
        return command

    def await_reply(self, command: ev.Command, timeout_s: float = 60.0) -> ev.Reply:
        """The reply to ``command``; raises ``CommandRefused`` with its message on an ``ErrorReply``."""
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.events:
                if isinstance(event, ev.Reply) and event.reply_to == command.cmd_id:
                    if isinstance(event, ev.ErrorReply):
                        raise CommandRefused(event.message)
                    return event
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no reply to {type(command).__name__} within {timeout_s}s"
            self._receive(min(remaining, 0.1))

    def request(self, peer: str, cls: type[ev.Command], *, wait_s: float = 60.0, **fields) -> ev.Reply:
        return self.await_reply(self.send(peer, cls, **fields), wait_s)

    def refusal(self, peer: str, cls: type[ev.Command], **fields) -> str:
        """The message of the ``ErrorReply`` a command must get."""
        try:
            reply = self.request(peer, cls, wait_s=30.0, **fields)
        except CommandRefused as refused:
            return str(refused)
        raise AssertionError(f"{cls.__name__} was accepted: {reply}")

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


class ClusterProcesses:
    """``dataplane.worker`` processes and one ``dataplane.engine.host``, pointed at ``controller``."""

    def __init__(self, runtime: Path, tmp_path: Path, controller: StandInController, num_workers: int) -> None:
        (tmp_path / "none.toml").write_text("")
        env = dict(
            os.environ,
            FLEXPIPE_RUNTIME_DIR=str(runtime),
            FLEXPIPE_CONFIG=str(tmp_path / "none.toml"),
            PYTHONPATH=str(REPO),
            FLEXPIPE_LOG_FORMAT="json",
        )
        self.request_endpoint = f"ipc://{runtime}/requests.sock"
        self.log = open(tmp_path / "cluster.log", "wb")
        self.processes: dict[str, subprocess.Popen] = {}
        common = ["--controller", controller.endpoint]
        for i in range(num_workers):
            self._start(
                f"worker-{i}", ["dataplane.worker", "--worker-id", f"worker-{i}", "--memory", "1GiB", *common], env
            )
        self._start(
            "engine-0",
            ["dataplane.engine.host", "--host-id", "engine-0", "--request-endpoint", self.request_endpoint, *common],
            env,
        )

    def _start(self, name: str, args: list[str], env: dict) -> None:
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", *args], env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO
        )

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            remove_rings_of(process.pid)
        self.log.close()
