"""A cluster worker process: one device, registered with the controller, serving the stages it is told to.

Run as ``python -m dataplane.worker --controller ENDPOINT --worker-id ID [--memory 4GiB]``.
It registers its device, heartbeats, reports per-stage metrics, and loads, connects and
unloads stages on the coordinator's commands. At most one stage per pipeline serves at a
time; during an inflight refactor the stage of the next epoch is prepared beside it
(``dataplane.worker.hosted_stage``), weights and KV move between workers on the data plane, and
the coordinator switches, commits or aborts epochs with bus commands.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket as pysocket
import sys
import threading
import time

import torch
import zmq

from common import events as ev
from common.config import load_config, parse_bytes
from common.errors import FlexPipeError
from common.logging import configure_logging, emit, get_logger
from common.runtime import freeze_heap, new_session_dir, notify_systemd
from controlplane.client import BusClient, Heartbeater, failure_reply
from dataplane.stage.server import set_device
from dataplane.worker.devices import probe_device
from dataplane.worker.hosted_stage import HostedStage

POLL_MS = 100
DEFAULT_PARAM_CACHE_BYTES = 1 << 30


class Worker:
    """Serves one device for the cluster.

    Invariants: it heartbeats every interval the controller asked for, also while
    serving; it answers every command with its reply or an ``ErrorReply`` (a prepare or
    an activation when it is done, the rest at once); it serves at most one stage per
    pipeline per epoch; queued KV sends progress between micro-batches; stopping it
    closes every stage and socket.
    """

    def __init__(
        self,
        bus: BusClient,
        worker_id: str,
        device: ev.DeviceInfo,
        torch_device: str,
        key_dir=None,
        insecure: bool = False,
        param_cache_bytes: int = DEFAULT_PARAM_CACHE_BYTES,
    ) -> None:
        self.bus, self.worker_id, self.device, self.torch_device = bus, worker_id, device, torch_device
        self.key_dir, self.insecure, self.param_cache_bytes = key_dir, insecure, param_cache_bytes
        self.context = bus.context
        self.session_dir = str(new_session_dir(f"worker-{worker_id}-"))
        self.stages: dict[str, HostedStage] = {}
        self.heartbeat_interval_s = 1.0
        self.log = get_logger(worker_id=worker_id)
        self.heartbeater: Heartbeater | None = None
        self._polled: tuple = ()
        self._cached_poller = zmq.Poller()
        self._running = True

    def stop(self, *_args) -> None:
        self._running = False

    def register(self, timeout_s: float = 60.0) -> None:
        reply = self.bus.request_until_answered(
            ev.RegisterWorker,
            timeout_s,
            lambda: self._running,
            worker_id=self.worker_id,
            host=self.device.host,
            pid=os.getpid(),
            device=self.device,
        )
        self.heartbeat_interval_s = reply.heartbeat_interval_s

    def run(self) -> None:
        self.register()
        self.heartbeater = Heartbeater(
            self.bus.endpoint,
            self.worker_id,
            self.heartbeat_interval_s,
            key_dir=self.key_dir,
            insecure=self.insecure,
            context=self.context,
            metrics=self._metrics,
        ).start()
        emit(self.log, "process.ready", device=self.device.device_id, memory_total=self.device.memory_total)
        freeze_heap()
        notify_systemd()
        while self._running:
            if self.heartbeater.needs_registration.is_set():
                self.heartbeater.needs_registration.clear()
                self.register()
            wait_ms = self._pump()
            self._poll(timeout_ms=0 if self._has_queued() else wait_ms)
            for hosted in list(self.stages.values()):
                if hosted.queue:
                    hosted.serve_next()
        self.close()

    def _has_queued(self) -> bool:
        return any(h.queue for h in self.stages.values())

    def _pump(self) -> int:
        """Send the KV chunks that are due; milliseconds until the next one is (at most ``POLL_MS``)."""
        wait_ms = POLL_MS
        for hosted in list(self.stages.values()):
            due = hosted.epochs.pump()
            if due is not None:
                wait_ms = min(wait_ms, int(due * 1000))
        return wait_ms

    def _poller(self) -> zmq.Poller:
        """A poller over the bus and every stage inbox, rebuilt only when the stages changed."""
        sockets = (self.bus.socket, *(hosted.inbox.socket for hosted in self.stages.values()))
        if sockets != self._polled:
            self._polled, self._cached_poller = sockets, zmq.Poller()
            for socket in sockets:
                self._cached_poller.register(socket, zmq.POLLIN)
        return self._cached_poller

    def _poll(self, timeout_ms: int) -> None:
        ready = dict(self._poller().poll(timeout_ms))
        for hosted in list(self.stages.values()):
            if hosted.inbox.socket in ready:
                hosted.receive()
        if self.bus.socket in ready:
            while (event := self.bus.receive(0)) is not None:
                self._on_command(event)

    def _metrics(self) -> list[ev.Event]:
        stages = [m for h in list(self.stages.values()) if (m := h.metrics()) is not None]
        return [ev.WorkerMetrics(sender=f"{self.worker_id}.heartbeat", worker_id=self.worker_id, stages=stages)]

    def _on_command(self, event) -> None:
        handler = {
            ev.LoadStage: self._load,
            ev.ConnectStage: self._connect,
            ev.UnloadStage: self._unload,
            ev.OpenStageInbox: self._open_inbox,
            ev.PrepareStageEpoch: self._prepare,
            ev.SendStageUnits: self._send_units,
            ev.CopyStageKv: self._copy_kv,
            ev.ActivateStageEpoch: self._activate,
            ev.CommitStageEpoch: self._commit,
            ev.AbortStageEpoch: self._abort,
        }.get(type(event))
        if handler is None:
            return
        try:
            reply = handler(event)
        except Exception as exc:  # every command gets an answer, failures included
            reply = failure_reply(self.worker_id, event, exc)
            emit(
                self.log,
                "stage.load_failed" if isinstance(event, ev.LoadStage) else "bus.message_rejected",
                level="error",
                pipeline_id=getattr(event, "pipeline_id", ""),
                detail=reply.message,
            )
        if reply is not None:
            self.bus.send(reply)

    def _load(self, command: ev.LoadStage) -> ev.StageLoaded:
        old = self.stages.get(command.pipeline_id)
        if old is not None and old.busy:
            raise FlexPipeError(f"{self.worker_id} already serves a stage of pipeline {command.pipeline_id}")
        emit(
            self.log,
            "stage.loading",
            pipeline_id=command.pipeline_id,
            epoch=command.epoch,
            stage=command.stage,
            units=command.units,
        )
        started = time.perf_counter()
        set_device(self.torch_device)
        if old is not None:
            self.stages.pop(command.pipeline_id).close()
        hosted = self._host(command.pipeline_id, command.epoch, command.transport)
        try:
            server = hosted.load(command)
        except BaseException:
            self.stages.pop(command.pipeline_id).close()
            raise
        seconds = time.perf_counter() - started
        emit(
            self.log,
            "stage.loaded",
            pipeline_id=command.pipeline_id,
            epoch=command.epoch,
            stage=command.stage,
            param_bytes=server.executor.param_bytes,
            seconds=round(seconds, 3),
        )
        return ev.StageLoaded(
            sender=self.worker_id,
            reply_to=command.cmd_id,
            pipeline_id=command.pipeline_id,
            epoch=command.epoch,
            stage=command.stage,
            inbox_address=server.inbox.address,
            param_bytes=server.executor.param_bytes,
            kv_bytes=server.executor.kv_bytes,
            load_seconds=seconds,
            tensors_read=list(server.executor.tensors_read),
        )

    def _host(self, pipeline_id: str, epoch: int, transport: str) -> HostedStage:
        hosted = HostedStage(
            self.context,
            pipeline_id,
            epoch,
            transport,
            self.worker_id,
            self.session_dir,
            self.torch_device,
            self.bus.send,
            self.param_cache_bytes,
        )
        self.stages[pipeline_id] = hosted
        return hosted

    def _hosted(self, command) -> HostedStage:
        hosted = self.stages.get(command.pipeline_id)
        if hosted is None:
            raise FlexPipeError(f"{self.worker_id} holds nothing of pipeline {command.pipeline_id}")
        return hosted

    def _ack(self, command) -> ev.Ack:
        return ev.Ack(sender=self.worker_id, reply_to=command.cmd_id)

    def _connect(self, command: ev.ConnectStage) -> ev.Ack:
        self._hosted(command).connect(command)
        return self._ack(command)

    def _unload(self, command: ev.UnloadStage) -> ev.Ack:
        hosted = self.stages.pop(command.pipeline_id, None)
        if hosted is not None:
            hosted.close()
            emit(self.log, "stage.unloaded", pipeline_id=command.pipeline_id)
        return self._ack(command)

    # ---- inflight refactoring: replies to PrepareStageEpoch and ActivateStageEpoch come when done ----

    def _open_inbox(self, command: ev.OpenStageInbox) -> ev.StageInboxOpened:
        hosted = self.stages.get(command.pipeline_id) or self._host(
            command.pipeline_id, command.epoch, command.transport
        )
        return ev.StageInboxOpened(
            sender=self.worker_id,
            reply_to=command.cmd_id,
            pipeline_id=command.pipeline_id,
            epoch=command.epoch,
            inbox_address=hosted.inbox.address,
        )

    def _prepare(self, command: ev.PrepareStageEpoch) -> None:
        self._hosted(command).prepare(command)

    def _send_units(self, command: ev.SendStageUnits) -> ev.Ack:
        self._hosted(command).send_units(command)
        return self._ack(command)

    def _copy_kv(self, command: ev.CopyStageKv) -> ev.Ack:
        self._hosted(command).copy_kv(command)
        return self._ack(command)

    def _activate(self, command: ev.ActivateStageEpoch) -> None:
        self._hosted(command).activate(command)

    def _commit(self, command: ev.CommitStageEpoch) -> ev.StageEpochSettled:
        cached = self._hosted(command).commit(command)
        return ev.StageEpochSettled(
            sender=self.worker_id,
            reply_to=command.cmd_id,
            pipeline_id=command.pipeline_id,
            epoch=command.epoch,
            outcome="committed",
            cached_units=cached,
        )

    def _abort(self, command: ev.AbortStageEpoch) -> ev.StageEpochSettled:
        self._hosted(command).abort(command)
        return ev.StageEpochSettled(
            sender=self.worker_id,
            reply_to=command.cmd_id,
            pipeline_id=command.pipeline_id,
            epoch=command.epoch,
            outcome="aborted",
        )

    def close(self) -> None:
        if self.heartbeater is not None:
            self.heartbeater.stop()
        for pipeline_id in list(self.stages):
            self._unload(ev.UnloadStage(sender=self.worker_id, cmd_id=0, pipeline_id=pipeline_id))
        self.bus.close()
        shutil.rmtree(self.session_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FlexPipe cluster worker (one device)")
    parser.add_argument("--config", help="FlexPipe TOML configuration")
    parser.add_argument("--controller", help="controller endpoint (default: from the configuration)")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--device", default="cpu", help="torch device this worker serves (cpu, cuda:0, ...)")
    parser.add_argument("--memory", help="memory budget of a CPU worker's virtual device, e.g. 4GiB")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--param-cache", help="host memory for units this worker served before, e.g. 1GiB")
    parser.add_argument("--insecure", action="store_true", help="plain TCP to a loopback controller")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    configure_logging("worker")
    torch.set_num_threads(args.threads)
    memory = parse_bytes(args.memory) if args.memory else config.cluster.worker_memory
    device = probe_device(args.worker_id, args.device, memory, pysocket.gethostname())
    bus = BusClient(
        args.controller or config.controller.ipc_endpoint,
        sender=args.worker_id,
        key_dir=config.security.key_path,
        insecure=args.insecure or config.security.insecure,
    )
    cache_bytes = parse_bytes(args.param_cache) if args.param_cache else DEFAULT_PARAM_CACHE_BYTES
    worker = Worker(
        bus,
        args.worker_id,
        device,
        args.device,
        config.security.key_path,
        args.insecure or config.security.insecure,
        cache_bytes,
    )
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    warm_meta_device()
    code = 0
    try:
        worker.run()
    except FlexPipeError as exc:
        print(f"flexpipe worker {args.worker_id}: {exc}", file=sys.stderr)
        code = 1
    # Everything this process owns is closed by now. Leave without the interpreter's teardown: torch's
    # finalisers take about a second, and a warm-up thread still importing would abort it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def warm_meta_device() -> threading.Thread:
    """The first op on the ``meta`` device imports its kernels (about a second); pay that at start-up,
    not when a refactor builds a unit received from a peer. Returns the thread doing it, which runs at
    the lowest CPU priority so it never delays this or any other process's serving or heartbeats."""

    def warm() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        except OSError:
            pass
        torch.cat([torch.empty(1, device="meta")] * 2)

    thread = threading.Thread(target=warm, name="warm-meta", daemon=True)
    thread.start()
    return thread


if __name__ == "__main__":
    main()
