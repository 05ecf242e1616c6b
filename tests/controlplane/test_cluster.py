"""A real local cluster through fpctl: up, deploy, generate, status, a killed worker, down."""

import json
import os
import signal
import time
from pathlib import Path

import psutil
from cluster_support import HEARTBEAT_S, cluster_env, cluster_pids, fpctl, status  # noqa: F401 (fixture)

from common import events as ev
from common.runtime import shared_memory_dir
from controlplane.client import BusClient
from dataplane import LLM, SamplingParams


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
    assert result["text"] == offline.text
    assert result["usage"]["completion_tokens"] == len(offline.token_ids)
    refused = fpctl(env, "generate", "--pipeline", "p1", "--prompt", prompt, "--max-tokens", str(10**30), check=False)
    assert refused.returncode == 1 and "400 invalid_request_error" in refused.stderr
    assert "max_tokens" in refused.stderr and "Traceback" not in refused.stderr

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
    assert not list(Path(env["FLEXPIPE_RUNTIME_DIR"]).glob("*.sock")), "fpctl down leaves no endpoint behind"


def test_commands_fail_at_once_when_no_cluster_is_up(cluster_env):
    started = time.monotonic()
    result = fpctl(cluster_env, "events", check=False)
    assert result.returncode == 1 and "is the cluster up" in result.stderr
    assert time.monotonic() - started < 8  # not the 10 s bus timeout
