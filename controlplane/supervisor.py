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
import socket
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
from controlplane.client import BusClient, BusError, Heartbeater, missing_members

STATE_FILE = "cluster.json"
STOP_TIMEOUT_S = 10.0
RESTART_DELAY_S = 2.0
WORKER_MODULE = "dataplane.worker"
# Activations and gathered KV are a few hundred KiB to a few MiB per micro-batch. Above
# glibc's default mmap threshold every such tensor is a fresh mmap whose pages fault in
# on first touch, which costs more than the attention itself on small models; keeping
# them on the heap lets freed blocks be reused.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=536870912"


def worker_command(worker_id: str, memory: int, threads: int, *options: str) -> list[str]:
    """The command line of worker ``worker_id``: a virtual device of ``memory`` bytes on CPU hosts,
    ``threads`` torch threads, then ``options`` (``--controller``, ``--device``, ``--config``, ...)."""
    return [
        sys.executable,
        "-m",
        WORKER_MODULE,
        "--worker-id",
        worker_id,
        "--memory",
        str(memory),
        "--threads",
        str(threads),
        *options,
    ]


def worker_threads(num_workers: int) -> int:
    """Torch threads per worker on a CPU host: the cores but one, shared out. The core left over runs
    the engine (the gateway, or the offline ``LLM``'s process) and the controller; measured on 2
    cores, a worker given both cores stalled for seconds whenever anything else ran
    (scripts/bench/gateway.py: TPOT p99 28 s, 16 instead of 98 tokens/s)."""
    return max(1, ((os.cpu_count() or 1) - 1) // max(1, num_workers))


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a FlexPipe child process: importable sources, unbuffered output, heap tuning."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")])
    )
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), MALLOC_TUNABLES]))
    return env


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
        child.process = subprocess.Popen(
            child.argv, env=self.env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        child.started_at = time.monotonic()
        emit(self.log, "process.started", child=child.name, child_pid=child.process.pid)

    def watch(self) -> list[tuple[str, int, int]]:
        """Restart children that exited (one pass; call it periodically); returns (name, pid, exit code)
        of each child seen exiting in this pass."""
        now = time.monotonic()
        exited = []
        for child in self.children.values():
            if child.gave_up or child.process is None or child.process.poll() is None:
                continue
            if child.restart_at is None:
                remove_rings_of(child.process.pid)
                exited.append((child.name, child.process.pid, child.process.returncode))
                emit(
                    self.log,
                    "process.exited",
                    level="warning",
                    child=child.name,
                    child_pid=child.process.pid,
                    exit_code=child.process.returncode,
                )
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
        return exited

    def alive(self, name: str) -> bool:
        child = self.children.get(name)
        return child is not None and child.process is not None and child.process.poll() is None

    def pids(self, prefix: str = "") -> list[int]:
        """Pids of the running children whose name starts with ``prefix``, in start order."""
        return [
            c.process.pid
            for name, c in self.children.items()
            if name.startswith(prefix) and c.process is not None and c.process.poll() is None
        ]

    def stop_all(self, order: list[str] | None = None) -> None:
        names = [*(order or []), *(n for n in self.children if n not in (order or []))]
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


class SupervisorAgent:
    """A supervisor as a peer of the control bus: it registers with how many workers it may still
    start, heartbeats, starts workers on ``SpawnWorkers`` and reports every child that exits
    (``MemberExited``), so the controller learns of a dead worker at once.

    Invariants: it never starts more than ``spawn_capacity`` workers in all; every ``SpawnWorkers``
    is answered (``WorkersSpawned`` or an ``ErrorReply``); only the thread calling ``step`` touches
    its bus socket.
    """

    def __init__(
        self,
        supervisor: ProcessSupervisor,
        bus: BusClient,
        agent_id: str,
        worker_argv: Callable[[str], list[str]],
        spawn_capacity: int,
        first_worker_index: int,
        key_dir=None,
        insecure: bool = False,
    ) -> None:
        self.supervisor, self.bus, self.agent_id = supervisor, bus, agent_id
        self.worker_argv, self.spawn_capacity = worker_argv, spawn_capacity
        self.next_index = first_worker_index
        self.key_dir, self.insecure = key_dir, insecure
        self.heartbeater: Heartbeater | None = None

    def register(self, timeout_s: float = 30.0) -> None:
        self.bus.request_until_answered(
            ev.RegisterSupervisor,
            timeout_s,
            supervisor_id=self.agent_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            spawn_capacity=self.spawn_capacity,
        )
        if self.heartbeater is None:
            self.heartbeater = Heartbeater(
                self.bus.endpoint,
                self.agent_id,
                1.0,
                key_dir=self.key_dir,
                insecure=self.insecure,
                context=self.bus.context,
            ).start()

    def start_worker(self) -> str:
        worker_id = f"worker-{self.next_index}"
        self.next_index += 1
        self.supervisor.start(worker_id, self.worker_argv(worker_id))
        return worker_id

    def step(self, timeout_s: float) -> None:
        """Answer the commands that arrive within ``timeout_s`` and report children that exited."""
        if self.heartbeater is not None and self.heartbeater.needs_registration.is_set():
            self.heartbeater.needs_registration.clear()
            self.register()
        event = self.bus.receive(timeout_s)
        while event is not None:
            if isinstance(event, ev.SpawnWorkers):
                self.bus.send(self._spawn(event))
            event = self.bus.receive(0)
        for name, pid, code in self.supervisor.watch():
            self.bus.send(ev.MemberExited(sender=self.agent_id, member_id=name, pid=pid, exit_code=code))

    def _spawn(self, command: ev.SpawnWorkers) -> ev.Event:
        if command.count > self.spawn_capacity:
            return ev.ErrorReply(
                sender=self.agent_id,
                reply_to=command.cmd_id,
                code="spawn_refused",
                message=f"asked for {command.count} workers; {self.agent_id} may start {self.spawn_capacity} more",
            )
        self.spawn_capacity -= command.count
        worker_ids = [self.start_worker() for _ in range(command.count)]
        return ev.WorkersSpawned(sender=self.agent_id, reply_to=command.cmd_id, worker_ids=worker_ids)

    def close(self) -> None:
        if self.heartbeater is not None:
            self.heartbeater.stop()
        self.bus.close()


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
        self.supervisor = ProcessSupervisor(config.cluster.restart_limit, child_environment(), self.log)
        self.common = (["--config", config_path] if config_path else []) + (["--insecure"] if insecure else [])
        self.insecure = insecure
        self.worker_ids = [f"worker-{i}" for i in range(config.cluster.workers)]
        self.threads = worker_threads(len(self.worker_ids))
        self.agent: SupervisorAgent | None = None
        self.stopping = False

    def worker_argv(self, worker_id: str) -> list[str]:
        return worker_command(worker_id, self.config.cluster.worker_memory, self.threads, *self.common)

    def up(self) -> None:
        timeout = self.config.cluster.ready_timeout_s
        python = sys.executable
        self.supervisor.start("controller", [python, "-m", "controlplane.controller", *self.common])
        wait_until(
            lambda: self._dead_check("controller") or cluster_status(self.config) is not None, timeout, "controller"
        )
        for worker_id in self.worker_ids:
            self.supervisor.start(worker_id, self.worker_argv(worker_id))
        self.supervisor.start("engine-0", [python, "-m", "dataplane.gateway", "--host-id", "engine-0", *self.common])
        wait_until(self._all_registered, timeout, "workers and gateway")
        security = self.config.security
        bus = BusClient(
            self.config.controller.ipc_endpoint,
            sender="supervisor",
            key_dir=security.key_path,
            insecure=self.insecure or security.insecure,
        )
        self.agent = SupervisorAgent(
            self.supervisor,
            bus,
            "supervisor",
            self.worker_argv,
            self.config.cluster.spawn_limit,
            len(self.worker_ids),
            security.key_path,
            self.insecure or security.insecure,
        )
        self.agent.register()
        emit(self.log, "process.ready", children=list(self.supervisor.children))

    def _dead_check(self, name: str) -> bool:
        if not self.supervisor.alive(name):
            raise FlexPipeError(f"{name} exited during start-up (see the log)")
        return False

    def _all_registered(self) -> bool:
        for name in self.supervisor.children:
            self._dead_check(name)
        status = cluster_status(self.config)
        return status is not None and not missing_members(status, self.worker_ids, ["engine-0"])

    def serve(self) -> None:
        while not self.stopping:
            self.agent.step(0.2)

    def down(self) -> None:
        if self.agent is not None:
            self.agent.close()
        workers = [name for name in self.supervisor.children if name.startswith("worker-")]
        self.supervisor.stop_all(["engine-0", *workers, "controller"])


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
        state.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "workers": cluster.worker_ids,
                    "children": {n: c.process.pid for n, c in cluster.supervisor.children.items()},
                }
            )
        )
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
