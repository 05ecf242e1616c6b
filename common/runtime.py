"""The private runtime directory that holds IPC endpoints and shared-memory files."""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path


def runtime_dir() -> Path:
    """``$FLEXPIPE_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/flexpipe``, else ``/tmp/flexpipe-<uid>``; always mode 0700."""
    base = os.environ.get("FLEXPIPE_RUNTIME_DIR")
    if not base:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        base = os.path.join(xdg, "flexpipe") if xdg else os.path.join(tempfile.gettempdir(), f"flexpipe-{os.getuid()}")
    path = Path(base)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def new_session_dir(prefix: str) -> Path:
    """A fresh 0700 directory under the runtime directory for one pipeline's sockets."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=runtime_dir()))


def shared_memory_dir() -> Path:
    """Where shared-memory ring files live: /dev/shm when present, else the runtime dir."""
    dev_shm = Path("/dev/shm")
    if dev_shm.is_dir() and os.access(dev_shm, os.W_OK):
        return dev_shm
    return runtime_dir()


def remove_rings_of(pid: int) -> None:
    """Delete the shared-memory ring files a process owned; call it once the process has exited
    (a process killed by a signal cannot remove its own)."""
    for ring in shared_memory_dir().glob(f"flexpipe-{pid}-*"):
        ring.unlink(missing_ok=True)


def freeze_heap() -> None:
    """Take every object alive now out of the garbage collector's sight, as a serving process
    does once it has started. A full collection otherwise walks the hundreds of thousands of
    objects torch and transformers import (about 90 ms on a CPU host) and stalls whatever the
    process serves meanwhile; objects made later are collected as usual."""
    gc.collect()
    gc.freeze()


def notify_systemd(state: str = "READY=1") -> bool:
    """Tell systemd (``Type=notify`` units) about this service's state; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    import socket

    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True
