"""The controller process: monitor, coordinators, allocator and policy behind the control bus.

Run as ``python -m controlplane.controller [--config FILE] [--insecure]``. It binds the
IPC endpoint in the 0700 runtime directory and, when configured, a TCP endpoint
protected by CURVE (plain TCP only on loopback with ``--insecure``, with a warning).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from pathlib import Path

import zmq

from common.config import FlexPipeConfig, load_config
from common.errors import FlexPipeError
from common.logging import configure_logging, emit, get_logger
from common.runtime import freeze_heap, notify_systemd
from common.wire import MAX_MESSAGE_BYTES
from controlplane.allocator import Allocator
from controlplane.deploy.coordinator import DeployCoordinator
from controlplane.deploy.plan import plan_pipeline
from controlplane.monitor import Monitor
from controlplane.policy.actor import Policy
from controlplane.policy.estimate import load_candidates
from controlplane.policy.placement import AllocatorCapacity
from controlplane.refactor.coordinator import RefactorCoordinator
from controlplane.refactor.executor import RefactorExecutor
from controlplane.refactor.planner import RefactorPlanner
from controlplane.shell import ActorShell


def build_actors(config: FlexPipeConfig, inventory=None, refactor_timeouts_s: dict[str, float] | None = None) -> list:
    """The actors a controller hosts; ``inventory`` is an optional resource graph from a TOML file.
    The allocator is left out when the configuration names the endpoint where it runs alone."""
    controller = config.controller
    monitor = Monitor(controller.heartbeat_interval_s, controller.lost_after_heartbeats, config.policy)
    coordinator = DeployCoordinator(plan_pipeline)
    executor = RefactorExecutor(RefactorPlanner(coordinator, monitor))
    actors = [monitor, coordinator, executor, RefactorCoordinator(executor.plan, refactor_timeouts_s)]
    placeable = None
    if not controller.allocator:
        allocator = Allocator(inventory) if inventory is not None else Allocator()
        actors.append(allocator)
        placeable = AllocatorCapacity(allocator)
    actors.append(Policy(config.policy, load_candidates, placeable or (lambda *_: "")))
    return actors


class Controller:
    """Owns the controller's sockets and authenticator. Invariant: ``close()`` releases all of them."""

    def __init__(
        self,
        config: FlexPipeConfig,
        insecure: bool = False,
        inventory=None,
        refactor_timeouts_s: dict[str, float] | None = None,
    ) -> None:
        self.config = config
        self.context = zmq.Context()
        self.log = get_logger(process="controller")
        self.authenticator = None
        self.routers = [self._bind(config.controller.ipc_endpoint)]
        if config.controller.tcp:
            self.routers.append(self._bind_tcp(config.controller.tcp, insecure or config.security.insecure))
        remote = {}
        if config.controller.allocator:
            remote["allocator"] = self.context.socket(zmq.DEALER)
            remote["allocator"].setsockopt(zmq.LINGER, 0)
            remote["allocator"].connect(config.controller.allocator)
        self.remote_sockets = list(remote.values())
        self.shell = ActorShell(
            build_actors(config, inventory, refactor_timeouts_s), self.routers, name="controller", remote_actors=remote
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _bind(self, endpoint: str) -> zmq.Socket:
        socket = self.context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        socket.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_MESSAGE_BYTES)  # beyond this, libzmq drops the peer
        if endpoint.startswith("ipc://") and os.path.exists(endpoint[len("ipc://") :]):
            os.unlink(endpoint[len("ipc://") :])
        socket.bind(endpoint)
        emit(self.log, "bus.listening", endpoint=endpoint)
        return socket

    def _bind_tcp(self, endpoint: str, insecure: bool) -> zmq.Socket:
        from controlplane import security

        if insecure:
            security.check_insecure_endpoint(endpoint, insecure=True)
            emit(
                self.log,
                "bus.insecure",
                level="warning",
                endpoint=endpoint,
                detail="plain TCP without CURVE: any local process can talk to the controller",
            )
            return self._bind(endpoint)
        keys = security.load_keys(self.config.security.key_path)
        self.authenticator = security.start_authenticator(
            self.context,
            keys,
            lambda address, reason: emit(self.log, "bus.peer_denied", level="warning", address=address, reason=reason),
        )
        socket = self.context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_MESSAGE_BYTES)  # beyond this, libzmq drops the peer
        security.secure_server_socket(socket, keys)
        self.authenticator.watch(socket)
        socket.bind(endpoint)
        emit(self.log, "bus.listening", endpoint=endpoint, curve=True)
        return socket

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.shell.stop)
        emit(
            self.log, "controller.started", endpoints=[self.config.controller.ipc_endpoint, self.config.controller.tcp]
        )
        freeze_heap()
        notify_systemd()
        try:
            loop.run_until_complete(self.shell.run())
        finally:
            loop.close()
            self.close()
            emit(self.log, "controller.stopped")

    def start_thread(self) -> Controller:
        """Serve on a thread of this process (the offline ``LLM``); ``stop_thread()`` ends it and closes."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self.shell.run(),), name="flexpipe-controller", daemon=True
        )
        self._thread.start()
        return self

    def stop_thread(self, timeout_s: float = 10.0) -> None:
        if self._thread is None:
            return
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self.shell.stop)
        self._thread.join(timeout_s)
        self._loop.close()
        self._thread = None
        self.close()

    def actor(self, name: str):
        """The hosted actor ``name``; read it from another thread only for a snapshot of its state."""
        return self.shell.actors[name]

    def close(self) -> None:
        """Close every socket and remove the IPC endpoint's file, so no one mistakes it for a live controller."""
        for socket in [*self.routers, *self.remote_sockets]:
            socket.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
        self.context.term()
        endpoint = self.config.controller.ipc_endpoint
        if endpoint.startswith("ipc://"):
            Path(endpoint[len("ipc://") :]).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FlexPipe controller")
    parser.add_argument("--config", help="FlexPipe TOML configuration")
    parser.add_argument("--inventory", help="TOML resource inventory (default: built from worker registrations)")
    parser.add_argument("--insecure", action="store_true", help="allow plain TCP on a loopback endpoint")
    args = parser.parse_args(argv)
    configure_logging("controller")
    try:
        config = load_config(args.config)
        inventory = None
        if args.inventory:
            from common.topology import load_inventory

            inventory = load_inventory(args.inventory)
        Controller(config, args.insecure, inventory).run()
    except FlexPipeError as exc:
        print(f"flexpipe controller: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
