"""The cluster of ``fpctl up`` inside one process: the controller and an engine host on threads, a
supervisor starting the same worker processes. The offline ``LLM`` is its client."""

from __future__ import annotations

import itertools
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from common import events as ev
from common.config import ControllerConfig, FlexPipeConfig, PolicyConfig
from common.errors import FlexPipeError, PipelineError
from common.logging import get_logger
from controlplane.client import BusClient, BusError, missing_members, wait_for_pipeline
from controlplane.controller import Controller
from controlplane.supervisor import ProcessSupervisor, SupervisorAgent, child_environment, worker_command
from dataplane.engine.host import EngineHost, HostedEngine

ENGINE_HOST_ID = "engine-0"
SUPERVISOR_ID = "supervisor"
AGENT_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How each worker process is started: its torch device (by worker index), the memory its virtual
    CPU device declares, torch threads and the host parameter cache's bytes (None: the default)."""

    devices: tuple[str, ...]
    default_device: str
    memory: int
    threads: int
    param_cache_bytes: int | None = None

    def device(self, index: int) -> str:
        if index < len(self.devices):
            return self.devices[index]
        return f"cuda:{index}" if self.default_device == "cuda" else self.default_device


class InProcessCluster:
    """A controller, an engine host and ``num_workers`` worker processes, all owned by this object.

    Invariants: after construction every worker and the engine host are registered and alive, or
    everything started is stopped again and ``PipelineError`` says why; ``close()`` (also run by
    the owner's finaliser) stops every thread and process it started and removes ``session_dir``;
    every wait is bounded.
    """

    def __init__(
        self,
        session_dir: Path,
        num_workers: int,
        options: WorkerOptions,
        spawn_capacity: int,
        start_timeout_s: float,
        refactor_timeouts_s: dict[str, float] | None = None,
    ) -> None:
        self.session_dir, self.options = session_dir, options
        self.endpoint = f"ipc://{session_dir}/controller.sock"
        self.log = get_logger(process="llm")
        self.context = zmq.Context()
        self.controller: Controller | None = None
        self.engine_host: EngineHost | None = None
        self.agent: SupervisorAgent | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._client_ids = itertools.count(1)
        extra = {} if "FLEXPIPE_LOG_LEVEL" in os.environ else {"FLEXPIPE_LOG_LEVEL": "warning"}
        self.supervisor = ProcessSupervisor(0, child_environment(extra), self.log)
        try:
            self._start(num_workers, spawn_capacity, start_timeout_s, refactor_timeouts_s)
        except BaseException:
            self.close()
            raise

    def _start(
        self,
        num_workers: int,
        spawn_capacity: int,
        start_timeout_s: float,
        refactor_timeouts_s: dict[str, float] | None,
    ) -> None:
        session_dir = self.session_dir
        # the offline LLM serves the layout its caller chose: no traffic reaches a policy here
        config = FlexPipeConfig(controller=ControllerConfig(ipc=self.endpoint), policy=PolicyConfig(mode="static"))
        self.controller = Controller(config, refactor_timeouts_s=refactor_timeouts_s).start_thread()
        self.engine_host = EngineHost(
            BusClient(self.endpoint, sender=ENGINE_HOST_ID, context=self.context),
            ENGINE_HOST_ID,
            f"ipc://{session_dir}/requests.sock",
        )
        self._start_thread("flexpipe-engine-host", lambda: self.engine_host.run(notify=False))
        for index in range(num_workers):
            self.supervisor.start(f"worker-{index}", self.worker_argv(f"worker-{index}"))
        self.agent = SupervisorAgent(
            self.supervisor,
            BusClient(self.endpoint, sender=SUPERVISOR_ID, context=self.context),
            SUPERVISOR_ID,
            self.worker_argv,
            spawn_capacity,
            num_workers,
        )
        self.agent.register(start_timeout_s)
        self._start_thread("flexpipe-supervisor", self._supervise)
        self._wait_registered([f"worker-{i}" for i in range(num_workers)], start_timeout_s)

    def worker_argv(self, worker_id: str) -> list[str]:
        options = ["--controller", self.endpoint, "--device", self.options.device(int(worker_id.rsplit("-", 1)[1]))]
        if self.options.param_cache_bytes is not None:
            options += ["--param-cache", str(self.options.param_cache_bytes)]
        return worker_command(worker_id, self.options.memory, self.options.threads, *options)

    def _start_thread(self, name: str, target) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                self.agent.step(AGENT_POLL_S)
            except FlexPipeError as exc:  # the controller is gone: nothing left to report to
                self.log.warning("supervisor agent stopped", error=str(exc))
                return

    def _wait_registered(self, worker_ids: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.bus() as bus:
            while missing := missing_members(bus.request(ev.StatusRequest), worker_ids, [ENGINE_HOST_ID]):
                self._raise_if_a_worker_exited()
                if time.monotonic() > deadline:
                    raise PipelineError(f"{sorted(missing)} did not start within {timeout_s:.0f}s")
                time.sleep(0.05)

    def _raise_if_a_worker_exited(self) -> None:
        for name, child in list(self.supervisor.children.items()):
            if name.startswith("worker-") and child.process is not None and child.process.poll() is not None:
                raise PipelineError(
                    f"stage worker {name} (pid {child.process.pid}) exited with code {child.process.returncode}"
                )

    def bus(self) -> BusClient:
        """A client of the controller on a socket of its own (for the calling thread only)."""
        return BusClient(self.endpoint, sender=f"llm-{next(self._client_ids)}", context=self.context)

    def request(self, cls: type[ev.Command], timeout_s: float, **fields) -> ev.Event:
        """Send a command to the controller from any thread and return the reply. Raises ``BusError`` on
        an error reply or no reply within ``timeout_s``."""
        with self.bus() as bus:
            return bus.request(cls, timeout_s=timeout_s, **fields)

    def deploy(self, timeout_s: float, **fields) -> HostedEngine:
        """Deploy a pipeline and wait until it serves; returns its engine. Raises ``PipelineError`` with the reason."""
        pipeline_id = fields["pipeline_id"]
        with self.bus() as bus:
            bus.request(ev.DeployPipeline, timeout_s=10.0, **fields)
            try:
                view = wait_for_pipeline(
                    bus,
                    pipeline_id,
                    ("READY", "FAILED"),
                    timeout_s,
                    check=self._raise_if_a_worker_exited,
                    interval_s=0.02,
                )
            except BusError as exc:
                raise PipelineError(f"pipeline {pipeline_id} did not start: {exc}") from exc
        if view.state == "FAILED":
            raise PipelineError(f"pipeline {pipeline_id} failed to deploy: {view.reason}")
        return self.engine_host.engines[pipeline_id]

    def worker_pids(self) -> list[int]:
        return self.supervisor.pids("worker-")

    def member_pid(self, worker_id: str) -> int | None:
        member = self.controller.actor("monitor").members.get(worker_id)
        return member.pid if member is not None else None

    def close(self) -> None:
        self._stop.set()
        if self.engine_host is not None:
            self.engine_host.stop()
        for thread in self._threads:
            thread.join(15.0)
        if self.agent is not None:
            self.agent.close()
        self.supervisor.stop_all()
        if self.controller is not None:
            self.controller.stop_thread()
        self.context.destroy(linger=0)
        shutil.rmtree(self.session_dir, ignore_errors=True)
