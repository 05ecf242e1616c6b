"""The runtime directory and systemd readiness."""

import os
import socket
import stat

from common.runtime import notify_systemd, runtime_dir


def test_runtime_dir_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXPIPE_RUNTIME_DIR", str(tmp_path / "rt"))
    path = runtime_dir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_systemd_readiness_reaches_the_notify_socket(tmp_path, monkeypatch):
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        assert notify_systemd() is True
        assert listener.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify_systemd() is False
    assert os.environ.get("NOTIFY_SOCKET") is None
