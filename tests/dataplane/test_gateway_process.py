"""The gateway as systemd runs it: READY only once it can serve, a clear failure when its port is taken,
a clean exit on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from cluster_support import REPO, local_cluster_env

from common import events as ev
from controlplane.client import BusClient, BusError


@pytest.fixture
def controller(tmp_path):
    with local_cluster_env(tmp_path) as env:
        process = subprocess.Popen([sys.executable, "-m", "controlplane.controller"], env=env, cwd=REPO)
        endpoint = f"ipc://{env['FLEXPIPE_RUNTIME_DIR']}/controller.sock"
        deadline = time.monotonic() + 30
        while True:
            try:
                with BusClient(endpoint, timeout_s=0.5) as bus:
                    bus.request(ev.StatusRequest)
                break
            except BusError:
                assert time.monotonic() < deadline and process.poll() is None, "the controller did not start"
        yield env, endpoint
        process.terminate()
        process.wait(10)


def start_gateway(env, tmp_path, port: int) -> tuple[subprocess.Popen, socket.socket]:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    gateway = subprocess.Popen(
        [sys.executable, "-m", "dataplane.gateway", "--host-id", "gw-test", "--http-port", str(port)],
        env=dict(env, NOTIFY_SOCKET=str(tmp_path / "notify")),
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    return gateway, notify


def test_ready_only_once_it_serves_and_registered_its_address(controller, tmp_path):
    env, endpoint = controller
    gateway, notify = start_gateway(env, tmp_path, 0)
    try:
        assert notify.recv(64) == b"READY=1"
        with BusClient(endpoint) as bus:
            (host,) = bus.request(ev.StatusRequest).engine_hosts
        assert host.host_id == "gw-test" and host.http_address.startswith("http://127.0.0.1:")
        health = httpx.get(f"{host.http_address}/health", timeout=5)
        assert health.status_code == 200 and health.json() == {"status": "ok", "pipelines": 0, "ready": 0}
        assert httpx.get(f"{host.http_address}/v1/models", timeout=5).json() == {"object": "list", "data": []}
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(30) == 0
    finally:
        notify.close()
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()


def test_a_taken_port_fails_start_up_with_the_reason(controller, tmp_path):
    env, _ = controller
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        gateway, notify = start_gateway(env, tmp_path, taken.getsockname()[1])
        try:
            assert gateway.wait(60) == 1
            assert "cannot listen on 127.0.0.1:" in gateway.stderr.read()
            notify.settimeout(0.1)
            with pytest.raises(TimeoutError):
                notify.recv(64)
        finally:
            notify.close()
