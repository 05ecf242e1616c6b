"""A real local cluster through fpctl: up, deploy, generate, status, a killed worker, down."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common import events as ev
from common.runtime import shared_memory_dir
from controlplane.client import BusClient
from dataplane import LLM, SamplingParams

REPO = Path(__file__).resolve().parents[2]
HEARTBEAT_S = 0.5


@pytest.fixture
def cluster_env(tmp_path):
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
    )
    (tmp_path / "none.toml").write_text("")
    yield env
    fpctl(env, "down", check=False)
    shutil.rmtree(runtime, ignore_errors=True)


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


def test_up_deploy_generate_kill_down(cluster_env, tiny_model):
    env = cluster_env
    fpctl(env, "up", "--workers", "3")
    pids = cluster_pids(env)
    assert all(psutil.pid_exists(p) for p in pids)

    deployed = json.loads(
        fpctl(env, "deploy", "--model", str(tiny_model), "--stages", "3", "--pipeline", "p1", "--json").stdout
    )
    assert deployed["state"] == "READY", deployed

    prompt = "the quick brown fox"
    result = json.loads(
        fpctl(env, "generate", "--pipeline", "p1", "--prompt", prompt, "--max-tokens", "12", "--json").stdout
    )
    with LLM(tiny_model, num_stages=1) as llm:
        (offline,) = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))
    assert result["token_ids"] == offline.outputs[0].token_ids
    assert result["usage"]["completion_tokens"] == len(result["token_ids"])
    refused = fpctl(env, "generate", "--pipeline", "p1", "--prompt", prompt, "--max-tokens", str(10**30), check=False)
    assert refused.returncode == 1 and "request_refused" in refused.stderr and "Traceback" not in refused.stderr

    snapshot = status(env)
    assert sorted(w["worker_id"] for w in snapshot["workers"] if w["state"] == "alive") == [
        "worker-0",
        "worker-1",
        "worker-2",
    ]
    (pipeline,) = snapshot["pipelines"]
    assert pipeline["state"] == "READY" and len(pipeline["stages"]) == 3
    units = [u for stage in pipeline["stages"] for u in stage["units"]]
    assert units[0] == "embed" and units[-1] == "head"
    assert all("queue_length" in stage for stage in pipeline["stages"])
    assert len({stage["worker_id"] for stage in pipeline["stages"]}) == 3, "one stage per device"

    victim = next(w for w in snapshot["workers"] if w["worker_id"] == pipeline["stages"][1]["worker_id"])
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    with BusClient(f"ipc://{env['FLEXPIPE_RUNTIME_DIR']}/controller.sock") as bus:
        while True:
            reply = bus.request(ev.StatusRequest)
            state = next(w.state for w in reply.workers if w.worker_id == victim["worker_id"])
            if state == "lost":
                break
            assert time.monotonic() - killed_at < 3 * HEARTBEAT_S + 1.0, "the killed worker is not marked lost"
            time.sleep(0.05)
    assert reply.pipelines[0].state == "DEGRADED" and victim["worker_id"] in reply.pipelines[0].reason
    with BusClient(f"ipc://{env['FLEXPIPE_RUNTIME_DIR']}/controller.sock") as bus:
        while True:  # the supervisor restarts it (after its restart delay) and it registers again
            back = next(w for w in bus.request(ev.StatusRequest).workers if w.worker_id == victim["worker_id"])
            if back.state == "alive":
                break
            assert time.monotonic() - killed_at < 30, "the killed worker was not restarted"
            time.sleep(0.2)
    assert back.pid != victim["pid"]
    assert not list(shared_memory_dir().glob(f"flexpipe-{victim['pid']}-*")), "the killed worker's rings are removed"

    started = time.monotonic()
    refused = fpctl(
        env, "generate", "--pipeline", "p1", "--prompt", prompt, "--max-tokens", "4", check=False, timeout=60
    )
    assert refused.returncode != 0 and "degraded" in refused.stderr
    assert time.monotonic() - started < 30, "a degraded pipeline answers instead of hanging"

    fpctl(env, "down")
    deadline = time.monotonic() + 20
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, "processes left behind by fpctl down"
        time.sleep(0.2)
    assert not (Path(env["FLEXPIPE_RUNTIME_DIR"]) / "cluster.json").exists()
    assert not [ring for pid in pids for ring in shared_memory_dir().glob(f"flexpipe-{pid}-*")]
