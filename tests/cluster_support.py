"""A real local cluster started with fpctl in a private runtime directory, and fpctl run against it."""

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 0.5


@contextmanager
def local_cluster_env(tmp_path: Path, **settings: str):
    """The environment of a cluster with its own runtime directory, no configuration file, its gateway
    on any free port and a static policy (``settings``: more ``FLEXPIPE_*`` variables, which win); the cluster is
    brought down on exit."""
    runtime = Path(f"/tmp/fp-{os.getpid()}-{tmp_path.name[-12:]}")
    runtime.mkdir(mode=0o700)
    env = dict(
        os.environ,
        FLEXPIPE_RUNTIME_DIR=str(runtime),
        FLEXPIPE_CONTROLLER_HEARTBEAT_INTERVAL_S=str(HEARTBEAT_S),
        FLEXPIPE_CLUSTER_WORKER_MEMORY="1GiB",
        FLEXPIPE_CONFIG=str(tmp_path / "none.toml"),
        PYTHONPATH=str(REPO),
        FLEXPIPE_LOG_FORMAT="json",
        FLEXPIPE_GATEWAY_PORT="0",
        FLEXPIPE_POLICY_MODE="static",  # tests that change layouts themselves; the policy's own test sets flexpipe
    )
    env.update(settings)
    (tmp_path / "none.toml").write_text("")
    try:
        yield env
    finally:
        fpctl(env, "down", check=False)
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def cluster_env(tmp_path):
    with local_cluster_env(tmp_path) as env:
        yield env


def fpctl(env, *args, check=True, timeout=180):
    result = subprocess.run(
        [sys.executable, "-m", "controlplane.cli.fpctl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"fpctl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def status(env) -> dict:
    return json.loads(fpctl(env, "status", "--json").stdout)


def cluster_pids(env) -> list[int]:
    state = json.loads((Path(env["FLEXPIPE_RUNTIME_DIR"]) / "cluster.json").read_text())
    return [state["pid"], *state["children"].values()]


def gateway_url(env) -> str:
    """The OpenAI API's base address of the cluster's gateway, as ``fpctl status`` shows it."""
    return next(h["http_address"] for h in status(env)["engine_hosts"] if h["http_address"])
