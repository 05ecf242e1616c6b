"""Starting, watching and stopping a pipeline's stage worker processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path

import msgspec
import zmq

from common.errors import PipelineError
from common.runtime import remove_rings_of
from dataplane import worker_protocol as proto


# Activations and gathered KV are a few hundred KiB to a few MiB per micro-batch. Above
# glibc's default mmap threshold every such tensor is a fresh mmap whose pages fault in
# on first touch, which costs more than the attention itself on small models; keeping
# them on the heap lets freed blocks be reused.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=536870912"


def worker_environment() -> dict[str, str]:
    """Environment for a stage worker process: importable sources, unbuffered output, heap tuning."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")]))
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), MALLOC_TUNABLES]))
    return env


class StageProcesses:
    """Supervises a pipeline's stage worker processes, started at once or later on demand.

    Invariants: every started process is stopped by ``close()`` (also run by a
    finaliser if the owner forgets); every wait for a worker is bounded by a
    timeout; only the death of a worker in ``serving`` is fatal to the pipeline, and a
    worker that exits is reported with its exit code.
    """

    def __init__(self, count: int, session_dir: Path, transport: str, context: zmq.Context,
                 start_timeout_s: float = 120.0, threads_per_worker: int = 1,
                 param_cache_bytes: int | None = None) -> None:
        self.session_dir, self.transport = session_dir, transport
        self.start_timeout_s = start_timeout_s
        self.threads_per_worker = threads_per_worker
        self.param_cache_bytes = param_cache_bytes
        self.control = context.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control_address = f"ipc://{session_dir}/control.sock"
        self.control.bind(self.control_address)
        self.processes: dict[int, subprocess.Popen] = {}
        self._finalizer = weakref.finalize(self, _stop_processes, self.processes, self.control, session_dir)
        self.identities: dict[int, bytes] = {}
        self.workers_by_identity: dict[bytes, int] = {}
        self.inboxes: dict[int, str] = {}
        self.serving: set[int] = set()
        self.spawn(count)
        self.serving = set(range(count))

    def spawn(self, count: int) -> list[int]:
        """Start ``count`` more workers and wait until each said hello; returns their ids."""
        env = worker_environment()
        first = max(self.processes, default=-1) + 1
        new = list(range(first, first + count))
        for worker in new:
            argv = [sys.executable, "-m", "dataplane.worker", "--control", self.control_address,
                    "--worker-id", str(worker), "--session-dir", str(self.session_dir), "--transport", self.transport,
                    "--threads", str(self.threads_per_worker)]
            if self.param_cache_bytes is not None:
                argv += ["--param-cache-bytes", str(self.param_cache_bytes)]
            self.processes[worker] = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
        waiting = set(new)
        deadline = time.monotonic() + self.start_timeout_s
        while waiting:
            self._raise_if_any_dead(waiting)
            if time.monotonic() > deadline:
                raise PipelineError(f"stage workers {sorted(waiting)} did not start within {self.start_timeout_s:.0f}s")
            received = self.receive(0.2)
            if received is not None and isinstance(received[1], proto.WorkerHello):
                waiting.discard(received[0])
        return new

    def send(self, worker: int, message) -> None:
        self.control.send_multipart([self.identities[worker], proto.encode(message)])

    def receive(self, timeout_s: float):
        """The next (worker id, message) from any worker, or None after ``timeout_s``."""
        if not self.control.poll(int(timeout_s * 1000)):
            return None
        identity, data = self.control.recv_multipart()
        try:
            message = proto.decode(data)
        except msgspec.DecodeError as exc:
            raise PipelineError(f"a stage worker sent a malformed control message: {exc}") from exc
        if isinstance(message, proto.WorkerHello):
            worker = int(message.worker_id)
            self.identities[worker], self.inboxes[worker] = identity, message.inbox
            self.workers_by_identity[identity] = worker
        return self.workers_by_identity.get(identity), message

    def _receive(self, expected: type, timeout_s: float | None = None):
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        while time.monotonic() < deadline:
            self.raise_if_dead()
            received = self.receive(0.2)
            if received is None:
                continue
            worker, message = received
            if isinstance(message, proto.WorkerError):
                raise PipelineError(message.message)
            if isinstance(message, expected):
                return worker, message
        raise PipelineError(f"stage workers did not answer within {timeout_s or self.start_timeout_s:.0f}s")

    def load(self, commands: list[proto.LoadStage]) -> list[proto.StageLoaded]:
        for worker, command in enumerate(commands):
            self.send(worker, command)
        loaded = {}
        while len(loaded) < len(commands):
            _, reply = self._receive(proto.StageLoaded)
            loaded[reply.stage] = reply
        return [loaded[stage] for stage in sorted(loaded)]

    def dead_workers(self, among=None) -> list[tuple[int, int, int]]:
        """(worker id, pid, exit code) of every worker (of ``among``, if given) that has exited."""
        return [(i, p.pid, p.returncode) for i, p in self.processes.items()
                if (among is None or i in among) and p.poll() is not None]

    def _raise_if_any_dead(self, among) -> None:
        dead = self.dead_workers(among)
        if dead:
            i, pid, code = dead[0]
            raise PipelineError(f"stage worker {i} (pid {pid}) exited with code {code}")

    def raise_if_dead(self) -> None:
        """Raise if a worker the serving layout needs has exited."""
        self._raise_if_any_dead(self.serving)

    def forget_dead(self) -> list[int]:
        """Drop exited workers that no layout needs; returns their ids."""
        gone = [i for i, _, _ in self.dead_workers() if i not in self.serving]
        for worker in gone:
            process = self.processes.pop(worker)
            remove_rings_of(process.pid)
            self.workers_by_identity.pop(self.identities.pop(worker, b""), None)
            self.inboxes.pop(worker, None)
        return gone

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values()]

    def pid_of(self, worker: int) -> int:
        return self.processes[worker].pid

    def close(self, timeout_s: float = 10.0) -> None:
        for identity in self.identities.values():
            try:
                self.control.send_multipart([identity, proto.encode(proto.Shutdown())], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self._finalizer.detach()
        _stop_processes(self.processes, self.control, self.session_dir, timeout_s)


def _stop_processes(by_id: dict[int, subprocess.Popen], control: zmq.Socket, session_dir: Path,
                    timeout_s: float = 5.0) -> None:
    processes = list(by_id.values())
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.terminate()
    for process in processes:
        try:
            process.wait(2.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for process in processes:
        remove_rings_of(process.pid)
    control.close(linger=0)
    shutil.rmtree(session_dir, ignore_errors=True)
