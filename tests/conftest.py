"""Shared fixtures: real tiny checkpoints on disk and a guard against leftover processes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psutil
import pytest

_USER_CACHE = Path(os.environ.get("FLEXPIPE_CACHE_DIR") or Path.home() / ".cache" / "flexpipe")
_CACHE = Path(tempfile.mkdtemp(prefix="flexpipe-test-cache-"))
os.environ.setdefault("FLEXPIPE_CACHE_DIR", str(_CACHE))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from dataplane.models.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def default_model() -> Path:
    """SmolLM2-135M-Instruct in the user's model cache, where ``make install`` prepared it (converted there
    first, about 45 s on 2 cores, when it is missing); conversion itself is tested in its own cache."""
    from dataplane.models.default_model import ensure_default_model

    return ensure_default_model(_USER_CACHE)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(kind, **overrides)``: a tiny random HF checkpoint written once per session."""
    from checkpoints import write_checkpoint

    written: dict[tuple, Path] = {}

    def make(kind: str, **overrides) -> Path:
        key = (kind, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in written:
            written[key] = write_checkpoint(kind, tmp_path_factory.mktemp(kind), **overrides)
        return written[key]

    return make


def stage_worker_children() -> list[psutil.Process]:
    children = psutil.Process().children(recursive=True)
    result = []
    for child in children:
        try:
            if "dataplane.worker" in " ".join(child.cmdline()):
                result.append(child)
        except psutil.Error:
            pass
    return result


@pytest.fixture(autouse=True, scope="module")
def no_leftover_workers():
    yield
    leftovers = psutil.wait_procs(stage_worker_children(), timeout=10)[1]
    for process in leftovers:
        process.kill()
    assert not leftovers, f"stage worker processes left running: {[p.pid for p in leftovers]}"


@pytest.fixture
def restore_logging(monkeypatch):
    """The test starts without FlexPipe log env vars and leaves structlog and the root logger as it found them."""
    import logging
    import warnings

    import structlog

    monkeypatch.delenv("FLEXPIPE_LOG_FORMAT", raising=False)
    monkeypatch.delenv("FLEXPIPE_LOG_LEVEL", raising=False)
    structlog_config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    showwarning = warnings.showwarning
    yield
    structlog.configure(**structlog_config)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)
    warnings.showwarning = showwarning
