"""The gateway process: an engine host with the OpenAI API in front of its engines.

Run as ``python -m dataplane.gateway [--config FILE] [--host-id ID] [--http-host H] [--http-port P]``.
The engine host's loop owns the main thread (control bus, engine commands); uvicorn serves the ASGI
app on a thread of its own. systemd hears READY only when both serve: the HTTP socket is listening
and the controller has acknowledged the registration, which carries the HTTP address.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time

import uvicorn
from prometheus_client import disable_created_metrics

from common.config import FlexPipeConfig, load_config, with_overrides
from common.errors import FlexPipeError
from common.logging import configure_logging
from common.runtime import runtime_dir
from controlplane.client import BusClient
from dataplane.engine.host import EngineHost
from dataplane.gateway.app import build_app
from dataplane.gateway.cluster_view import ClusterView
from dataplane.gateway.service import Gateway
from dataplane.gateway.traffic import TrafficRecorder

HTTP_START_TIMEOUT_S = 30.0
HTTP_STOP_TIMEOUT_S = 10.0


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound and listening (port 0: any free port); raises ``FlexPipeError`` when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise FlexPipeError(f"the gateway cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


def http_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class GatewayProcess:
    """Owns the HTTP server thread, the engine host and the cluster view. Invariant: ``stop`` ends all
    three, and ``run`` returns only after they have ended."""

    def __init__(self, config: FlexPipeConfig, host_id: str, controller: str, request_endpoint: str, insecure: bool):
        self.sock = listening_socket(config.gateway.host, config.gateway.port)
        self.address = http_address(self.sock)
        key_dir = config.security.key_path
        self.cluster_view = ClusterView(controller, f"{host_id}.status", key_dir, insecure)
        self.host = EngineHost(
            BusClient(controller, sender=host_id, key_dir=key_dir, insecure=insecure),
            host_id,
            request_endpoint,
            key_dir,
            insecure,
            http_address=self.address,
        )
        traffic = TrafficRecorder(host_id)
        self.host.traffic = traffic.reports
        self.gateway = Gateway(
            lambda: self.host.engines,
            config.gateway,
            cluster=self.cluster_view.latest,
            traffic=traffic,
            scaled_to_zero=lambda: set(self.host.scaled_to_zero),
        )
        self.host.on_refactor_outcome = self.gateway.metrics.refactor_finished
        server_config = uvicorn.Config(
            build_app(self.gateway), log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(server_config)
        self.http_thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="http")

    def run(self) -> None:
        self.http_thread.start()
        deadline = time.monotonic() + HTTP_START_TIMEOUT_S
        while not self.server.started:
            if not self.http_thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise FlexPipeError(f"the HTTP server did not start on {self.address}")
            time.sleep(0.02)
        self.cluster_view.start()
        try:
            self.host.run()
        finally:
            self._stop_http()
            self.cluster_view.stop()

    def stop(self, *_args) -> None:
        self.host.stop()
        self.server.should_exit = True

    def _stop_http(self) -> None:
        self.server.should_exit = True
        if self.http_thread.is_alive():
            self.http_thread.join(HTTP_STOP_TIMEOUT_S)
        self.sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FlexPipe gateway: the OpenAI API over the engines it hosts")
    parser.add_argument("--config", help="FlexPipe TOML configuration")
    parser.add_argument("--controller", help="controller endpoint (default: from the configuration)")
    parser.add_argument("--host-id", default="engine-0")
    parser.add_argument("--request-endpoint", help="bus endpoint for generate requests (default: ipc, runtime dir)")
    parser.add_argument("--http-host", help="address to listen on (default: [gateway] host, loopback)")
    parser.add_argument("--http-port", type=int, help="port to listen on (default: [gateway] port; 0 = any free)")
    parser.add_argument("--insecure", action="store_true", help="plain TCP to a loopback controller")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    overrides = {"host": args.http_host, "port": args.http_port}
    config = with_overrides(config, gateway={k: v for k, v in overrides.items() if v is not None})
    configure_logging("gateway")
    disable_created_metrics()  # the ``*_created`` companions only repeat the process start time
    insecure = args.insecure or config.security.insecure
    endpoint = args.request_endpoint or f"ipc://{runtime_dir()}/requests-{args.host_id}.sock"
    try:
        process = GatewayProcess(
            config, args.host_id, args.controller or config.controller.ipc_endpoint, endpoint, insecure
        )
        signal.signal(signal.SIGTERM, process.stop)
        signal.signal(signal.SIGINT, process.stop)
        process.run()
    except FlexPipeError as exc:
        print(f"flexpipe gateway {args.host_id}: {exc}", file=sys.stderr)
        sys.exit(1)
