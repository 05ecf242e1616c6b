"""A cluster worker process: one device, registered with the controller, serving the stages it is told to.

Run as ``python -m dataplane.cluster_worker --controller ENDPOINT --worker-id ID [--memory 4GiB]``.
It registers its device, heartbeats, reports per-stage metrics, and loads, connects and
unloads stages on the coordinator's commands. At most one stage per pipeline.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket as pysocket
import sys
import time
from collections import deque

import torch
import zmq

from common import events as ev
from common.config import load_config, parse_bytes
from common.errors import FlexPipeError
from common.logging import configure_logging, emit, get_logger
from common.runtime import new_session_dir, notify_systemd
from controlplane.client import BusClient, Heartbeater
from dataplane.devices import probe_device
from dataplane.stage import StageSpec
from dataplane.stage_server import StageServer, set_device


class HostedStage:
    """A stage this worker serves, with its input queue and the counters its metrics come from."""

    def __init__(self, server: StageServer, pipeline_id: str) -> None:
        self.server, self.pipeline_id = server, pipeline_id
        self.queue: deque = deque()
        self.reported_at = time.monotonic()
        self.reported_busy = 0.0
        self.reported_tokens = 0

    def metrics(self, kv_blocks_total: int) -> ev.StageMetrics:
        now = time.monotonic()
        elapsed = max(1e-6, now - self.reported_at)
        busy = (self.server.busy_seconds - self.reported_busy) / elapsed
        tokens = (self.server.tokens_processed - self.reported_tokens) / elapsed
        self.reported_at, self.reported_busy, self.reported_tokens = now, self.server.busy_seconds, self.server.tokens_processed
        return ev.StageMetrics(pipeline_id=self.pipeline_id, epoch=self.server.epoch, stage=self.server.stage,
                               queue_length=len(self.queue), busy_fraction=round(min(1.0, busy), 4),
                               kv_blocks_used=0, kv_blocks_free=kv_blocks_total, tokens_per_s=round(tokens, 1))


class ClusterWorker:
    """Serves one device for the cluster.

    Invariants: it heartbeats every interval the controller asked for, also while
    serving; it answers every command with its reply or an ``ErrorReply``; it holds at
    most one stage per pipeline; stopping it closes every stage and socket.
    """

    def __init__(self, bus: BusClient, worker_id: str, device: ev.DeviceInfo, torch_device: str,
                 key_dir=None, insecure: bool = False) -> None:
        self.bus, self.worker_id, self.device, self.torch_device = bus, worker_id, device, torch_device
        self.key_dir, self.insecure = key_dir, insecure
        self.context = bus.context
        self.session_dir = str(new_session_dir(f"worker-{worker_id}-"))
        self.stages: dict[str, HostedStage] = {}
        self.heartbeat_interval_s = 1.0
        self.log = get_logger(worker_id=worker_id)
        self.heartbeater: Heartbeater | None = None
        self._running = True

    def stop(self, *_args) -> None:
        self._running = False

    def register(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = self.bus.request(ev.RegisterWorker, timeout_s=2.0, worker_id=self.worker_id,
                                         host=self.device.host, pid=os.getpid(), device=self.device)
                self.heartbeat_interval_s = reply.heartbeat_interval_s
                return
            except FlexPipeError:
                if time.monotonic() > deadline or not self._running:
                    raise

    def run(self) -> None:
        self.register()
        self.heartbeater = Heartbeater(self.bus.endpoint, self.worker_id, self.heartbeat_interval_s, key_dir=self.key_dir,
                                       insecure=self.insecure, context=self.context, metrics=self._metrics).start()
        emit(self.log, "process.ready", device=self.device.device_id, memory_total=self.device.memory_total)
        notify_systemd()
        while self._running:
            if self.heartbeater.needs_registration.is_set():
                self.heartbeater.needs_registration.clear()
                self.register()
            self._poll(timeout_ms=0 if self._has_queued() else 100)
            for hosted in list(self.stages.values()):
                if hosted.queue:
                    hosted.server.serve(hosted.queue.popleft())
        self.close()

    def _has_queued(self) -> bool:
        return any(h.queue for h in self.stages.values())

    def _poll(self, timeout_ms: int) -> None:
        poller = zmq.Poller()
        poller.register(self.bus.socket, zmq.POLLIN)
        for hosted in self.stages.values():
            poller.register(hosted.server.inbox.socket, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        for hosted in list(self.stages.values()):
            if hosted.server.inbox.socket in ready:
                while (message := hosted.server.inbox.recv(0)) is not None:
                    hosted.queue.append(message)
        if self.bus.socket in ready:
            while (event := self.bus.receive(0)) is not None:
                self._on_command(event)

    def _metrics(self) -> list[ev.Event]:
        stages = [h.metrics(h.server.spec.num_kv_blocks) for h in list(self.stages.values())]
        return [ev.WorkerMetrics(sender=f"{self.worker_id}.heartbeat", worker_id=self.worker_id, stages=stages)]

    def _on_command(self, event) -> None:
        handler = {ev.LoadStage: self._load, ev.ConnectStage: self._connect, ev.UnloadStage: self._unload}.get(type(event))
        if handler is None:
            return
        try:
            reply = handler(event)
        except Exception as exc:  # every command gets an answer, failures included
            detail = str(exc) if isinstance(exc, FlexPipeError) else f"{type(exc).__name__}: {exc}"
            emit(self.log, "stage.load_failed" if isinstance(event, ev.LoadStage) else "bus.message_rejected",
                 level="error", pipeline_id=getattr(event, "pipeline_id", ""), detail=detail)
            reply = ev.ErrorReply(sender=self.worker_id, reply_to=event.cmd_id, code="command_failed", message=detail)
        self.bus.send(reply)

    def _load(self, command: ev.LoadStage) -> ev.StageLoaded:
        if command.pipeline_id in self.stages:
            raise FlexPipeError(f"{self.worker_id} already serves a stage of pipeline {command.pipeline_id}")
        emit(self.log, "stage.loading", pipeline_id=command.pipeline_id, epoch=command.epoch, stage=command.stage,
             units=command.units)
        started = time.perf_counter()
        set_device(self.torch_device)
        spec = StageSpec(command.model_dir, tuple(command.units), command.num_kv_blocks, command.block_size,
                         command.dtype, self.torch_device)
        server = StageServer(self.context, spec, stage=command.stage, num_stages=command.num_stages,
                             epoch=command.epoch, transport=command.transport, session_dir=self.session_dir,
                             name=f"{command.pipeline_id}-{command.stage}")
        self.stages[command.pipeline_id] = HostedStage(server, command.pipeline_id)
        seconds = time.perf_counter() - started
        emit(self.log, "stage.loaded", pipeline_id=command.pipeline_id, epoch=command.epoch, stage=command.stage,
             param_bytes=server.executor.param_bytes, seconds=round(seconds, 3))
        return ev.StageLoaded(sender=self.worker_id, reply_to=command.cmd_id, pipeline_id=command.pipeline_id,
                              epoch=command.epoch, stage=command.stage, inbox_address=server.inbox.address,
                              param_bytes=server.executor.param_bytes, kv_bytes=server.executor.kv_bytes,
                              load_seconds=seconds)

    def _connect(self, command: ev.ConnectStage) -> ev.Ack:
        hosted = self.stages.get(command.pipeline_id)
        if hosted is None:
            raise FlexPipeError(f"{self.worker_id} serves no stage of pipeline {command.pipeline_id}")
        hosted.server.connect(command.next_address, command.engine_address, command.slot_bytes)
        return ev.Ack(sender=self.worker_id, reply_to=command.cmd_id)

    def _unload(self, command: ev.UnloadStage) -> ev.Ack:
        hosted = self.stages.pop(command.pipeline_id, None)
        if hosted is not None:
            for message in hosted.queue:
                message.release()
            hosted.server.close()
            emit(self.log, "stage.unloaded", pipeline_id=command.pipeline_id)
        return ev.Ack(sender=self.worker_id, reply_to=command.cmd_id)

    def close(self) -> None:
        if self.heartbeater is not None:
            self.heartbeater.stop()
        for pipeline_id in list(self.stages):
            self._unload(ev.UnloadStage(sender=self.worker_id, cmd_id=0, pipeline_id=pipeline_id))
        self.bus.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FlexPipe cluster worker (one device)")
    parser.add_argument("--config", help="FlexPipe TOML configuration")
    parser.add_argument("--controller", help="controller endpoint (default: from the configuration)")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--device", default="cpu", help="torch device this worker serves (cpu, cuda:0, ...)")
    parser.add_argument("--memory", help="memory budget of a CPU worker's virtual device, e.g. 4GiB")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--insecure", action="store_true", help="plain TCP to a loopback controller")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    configure_logging("worker")
    torch.set_num_threads(args.threads)
    memory = parse_bytes(args.memory) if args.memory else config.cluster.worker_memory
    device = probe_device(args.worker_id, args.device, memory, pysocket.gethostname())
    bus = BusClient(args.controller or config.controller.ipc_endpoint, sender=args.worker_id,
                    key_dir=config.security.key_path, insecure=args.insecure or config.security.insecure)
    worker = ClusterWorker(bus, args.worker_id, device, args.device, config.security.key_path,
                           args.insecure or config.security.insecure)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    try:
        worker.run()
    except FlexPipeError as exc:
        print(f"flexpipe worker {args.worker_id}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
