"""A controller process for tests that talk to it over real sockets."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import events as ev
from controlplane.client import BusClient, BusError

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ControllerProcess:
    """``python -m controlplane.controller`` with its own runtime dir; its log lines are kept."""

    def __init__(self, tmp_path: Path, extra_env: dict | None = None, args: list[str] | None = None) -> None:
        self.runtime = Path(f"/tmp/fpc-{os.getpid()}-{tmp_path.name[-10:]}")
        self.runtime.mkdir(mode=0o700, exist_ok=True)
        self.log_path = tmp_path / "controller.log"
        env = dict(
            os.environ,
            FLEXPIPE_RUNTIME_DIR=str(self.runtime),
            PYTHONPATH=str(REPO),
            FLEXPIPE_LOG_FORMAT="json",
            FLEXPIPE_CONFIG=str(tmp_path / "empty.toml"),
            **(extra_env or {}),
        )
        (tmp_path / "empty.toml").write_text("")
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "controlplane.controller", *(args or [])],
            env=env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.ipc = f"ipc://{self.runtime}/controller.sock"
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                with BusClient(self.ipc, timeout_s=0.5) as bus:
                    bus.request(ev.StatusRequest)
                return
            except BusError:
                assert time.monotonic() < deadline, f"controller did not answer: {self.log_path.read_text()[-2000:]}"

    def log_lines(self) -> list[dict]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
        return lines

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.log_file.close()
        for path in self.runtime.glob("*"):
            path.unlink()
        self.runtime.rmdir()
