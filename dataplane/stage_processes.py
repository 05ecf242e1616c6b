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
    """Supervises one worker process per stage.

    Invariants: every started process is stopped by ``close()`` (also run by a
    finaliser if the owner forgets); every wait for a worker is bounded by a
    timeout, and a worker that exits is reported with its exit code.
    """

    def __init__(self, count: int, session_dir: Path, transport: str, context: zmq.Context,
                 start_timeout_s: float = 120.0, threads_per_worker: int = 1) -> None:
        self.session_dir = session_dir
        self.start_timeout_s = start_timeout_s
        self.control = context.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        control_address = f"ipc://{session_dir}/control.sock"
        self.control.bind(control_address)
        env = worker_environment()
        self.processes = [
            subprocess.Popen([sys.executable, "-m", "dataplane.worker", "--control", control_address,
                              "--worker-id", str(i), "--session-dir", str(session_dir), "--transport", transport,
                              "--threads", str(threads_per_worker)], env=env, stdin=subprocess.DEVNULL)
            for i in range(count)
        ]
        self._finalizer = weakref.finalize(self, _stop_processes, list(self.processes), self.control, session_dir)
        self.identities: dict[int, bytes] = {}
        self.inboxes: dict[int, str] = {}
        for _ in range(count):
            identity, hello = self._receive(proto.WorkerHello)
            worker = int(hello.worker_id)
            self.identities[worker], self.inboxes[worker] = identity, hello.inbox

    def _receive(self, expected: type, timeout_s: float | None = None):
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        while time.monotonic() < deadline:
            self.raise_if_dead()
            if self.control.poll(200):
                identity, data = self.control.recv_multipart()
                try:
                    message = proto.decode(data)
                except msgspec.DecodeError as exc:
                    raise PipelineError(f"a stage worker sent a malformed control message: {exc}") from exc
                if isinstance(message, proto.WorkerError):
                    raise PipelineError(message.message)
                if isinstance(message, expected):
                    return identity, message
        raise PipelineError(f"stage workers did not answer within {timeout_s or self.start_timeout_s:.0f}s")

    def load(self, commands: list[proto.LoadStage]) -> list[proto.StageLoaded]:
        for worker, command in enumerate(commands):
            self.control.send_multipart([self.identities[worker], proto.encode(command)])
        loaded = {}
        while len(loaded) < len(commands):
            _, reply = self._receive(proto.StageLoaded)
            loaded[reply.stage] = reply
        return [loaded[stage] for stage in sorted(loaded)]

    def dead_workers(self) -> list[tuple[int, int, int]]:
        """(worker index, pid, exit code) of every worker that has exited."""
        return [(i, p.pid, p.returncode) for i, p in enumerate(self.processes) if p.poll() is not None]

    def raise_if_dead(self) -> None:
        dead = self.dead_workers()
        if dead:
            i, pid, code = dead[0]
            raise PipelineError(f"stage worker {i} (pid {pid}) exited with code {code}")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def close(self, timeout_s: float = 10.0) -> None:
        for identity in self.identities.values():
            try:
                self.control.send_multipart([identity, proto.encode(proto.Shutdown())], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self._finalizer.detach()
        _stop_processes(self.processes, self.control, self.session_dir, timeout_s)


def _stop_processes(processes: list[subprocess.Popen], control: zmq.Socket, session_dir: Path, timeout_s: float = 5.0) -> None:
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
