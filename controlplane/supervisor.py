"""Supervising child processes: start, watch, restart up to a limit, stop.

``ProcessSupervisor`` is the object; ``python -m controlplane.supervisor`` is the
local-cluster daemon ``fpctl up`` starts: a controller, N workers and an engine host,
each brought up with a ready check and a timeout, restarted when they die (at most
``restart_limit`` times), and all stopped on SIGTERM.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from common import events as ev
from common.config import FlexPipeConfig, load_config, with_overrides
from common.errors import FlexPipeError
from common.logging import configure_logging, emit, get_logger
from common.runtime import remove_rings_of, runtime_dir
from controlplane.client import BusClient, BusError

STATE_FILE = "cluster.json"
STOP_TIMEOUT_S = 10.0
RESTART_DELAY_S = 2.0


def cluster_state_path() -> Path:
    return runtime_dir() / STATE_FILE


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class Child:
    """A supervised process. ``restarts`` counts restarts since it was first started."""

    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    gave_up: bool = False
    started_at: float = field(default_factory=time.monotonic)
    restart_at: float | None = None


class ProcessSupervisor:
    """Starts children and keeps them running.

    Invariants: a child that exits is logged with its exit code and restarted unless
    it has used up ``restart_limit`` restarts (then it is logged and left down), after a
    delay of ``RESTART_DELAY_S`` times the restarts so far, so a crash loop does not spin; every
    child is gone after ``stop_all`` (SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``);
    children die with the supervisor (PR_SET_PDEATHSIG).
    """

    def __init__(self, restart_limit: int, env: dict[str, str], log) -> None:
        self.restart_limit = restart_limit
        self.env = env
        self.log = log
        self.children: dict[str, Child] = {}

    def start(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv)
        self.children[name] = child
        self._spawn(child)
        return child

    def _spawn(self, child: Child) -> None:
        child.process = subprocess.Popen(child.argv, env=self.env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        child.started_at = time.monotonic()
        emit(self.log, "process.started", child=child.name, child_pid=child.process.pid)

    def watch(self) -> None:
        """Restart children that exited (one pass; call it periodically)."""
        now = time.monotonic()
        for child in self.children.values():
            if child.gave_up or child.process is None or child.process.poll() is None:
                continue
            if child.restart_at is None:
                remove_rings_of(child.process.pid)
                emit(self.log, "process.exited", level="warning", child=child.name, child_pid=child.process.pid,
                     exit_code=child.process.returncode)
                if child.restarts >= self.restart_limit:
                    child.gave_up = True
                    emit(self.log, "process.restart_limit", level="error", child=child.name, restarts=child.restarts)
                    continue
                child.restart_at = now + RESTART_DELAY_S * (child.restarts + 1)
            if now < child.restart_at:
                continue
            child.restarts += 1
            child.restart_at = None
            self._spawn(child)
            emit(self.log, "process.restarted", child=child.name, child_pid=child.process.pid, restarts=child.restarts)

    def alive(self, name: str) -> bool:
        child = self.children.get(name)
        return child is not None and child.process is not None and child.process.poll() is None

    def stop_all(self, order: list[str] | None = None) -> None:
        names = order or list(self.children)
        for name in names:
            child = self.children[name]
            if child.process is not None and child.process.poll() is None:
                emit(self.log, "process.stopping", child=name, child_pid=child.process.pid)
                child.process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for name in names:
            process = self.children[name].process
            if process is None:
                continue
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            remove_rings_of(process.pid)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise FlexPipeError(f"{what} not ready within {timeout_s:.0f}s")
        time.sleep(interval_s)


def cluster_status(config: FlexPipeConfig, timeout_s: float = 2.0) -> ev.StatusReply | None:
    try:
        with BusClient(config.controller.ipc_endpoint, sender=f"supervisor-{os.getpid()}", timeout_s=timeout_s) as bus:
            return bus.request(ev.StatusRequest)
    except BusError:
        return None


class LocalCluster:
    """The processes of a one-machine cluster and their ready checks.

    Invariant: ``up`` either returns with the controller answering and every worker and
    the engine host registered and alive, or raises after stopping what it started.
    """

    def __init__(self, config: FlexPipeConfig, config_path: str | None, insecure: bool) -> None:
        self.config = config
        self.log = get_logger(process="supervisor")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")]))
        self.supervisor = ProcessSupervisor(config.cluster.restart_limit, env, self.log)
        self.common = (["--config", config_path] if config_path else []) + (["--insecure"] if insecure else [])
        self.worker_ids = [f"worker-{i}" for i in range(config.cluster.workers)]
        self.stopping = False

    def up(self) -> None:
        timeout = self.config.cluster.ready_timeout_s
        python = sys.executable
        self.supervisor.start("controller", [python, "-m", "controlplane.controller", *self.common])
        wait_until(lambda: self._dead_check("controller") or cluster_status(self.config) is not None, timeout, "controller")
        threads = max(1, (os.cpu_count() or 1) // max(1, len(self.worker_ids)))
        for worker_id in self.worker_ids:
            self.supervisor.start(worker_id, [python, "-m", "dataplane.cluster_worker", "--worker-id", worker_id,
                                              "--memory", str(self.config.cluster.worker_memory),
                                              "--threads", str(threads), *self.common])
        self.supervisor.start("engine-0", [python, "-m", "dataplane.engine_host", "--host-id", "engine-0", *self.common])
        wait_until(self._all_registered, timeout, "workers and engine host")
        emit(self.log, "process.ready", children=list(self.supervisor.children))

    def _dead_check(self, name: str) -> bool:
        if not self.supervisor.alive(name):
            raise FlexPipeError(f"{name} exited during start-up (see the log)")
        return False

    def _all_registered(self) -> bool:
        for name in self.supervisor.children:
            self._dead_check(name)
        status = cluster_status(self.config)
        if status is None:
            return False
        alive = {w.worker_id for w in status.workers if w.state == "alive"}
        hosts = {h.host_id for h in status.engine_hosts if h.state == "alive"}
        return set(self.worker_ids) <= alive and "engine-0" in hosts

    def serve(self) -> None:
        while not self.stopping:
            self.supervisor.watch()
            time.sleep(0.2)

    def down(self) -> None:
        self.supervisor.stop_all(["engine-0", *self.worker_ids, "controller"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FlexPipe local cluster supervisor (started by `fpctl up`)")
    parser.add_argument("--config")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--insecure", action="store_true")
    args = parser.parse_args(argv)
    configure_logging("supervisor")
    config = load_config(args.config)
    if args.workers:
        config = with_overrides(config, cluster={"workers": args.workers})
    cluster = LocalCluster(config, args.config, args.insecure)

    def on_signal(*_args) -> None:
        cluster.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    state = cluster_state_path()
    try:
        cluster.up()
        state.write_text(json.dumps({"pid": os.getpid(), "workers": cluster.worker_ids,
                                     "children": {n: c.process.pid for n, c in cluster.supervisor.children.items()}}))
        print("READY", flush=True)
        cluster.serve()
    except FlexPipeError as exc:
        emit(cluster.log, "process.exited", level="error", child="supervisor", reason=str(exc))
        print(f"FAILED {exc}", flush=True)
    finally:
        cluster.down()
        if state.exists():
            try:
                if json.loads(state.read_text()).get("pid") == os.getpid():
                    state.unlink()
            except (ValueError, OSError):
                pass


if __name__ == "__main__":
    main()
