"""Inflight refactoring of a cluster pipeline through fpctl: plan, split, migrate while a request streams,
refusals, and the timeline rebuilt from the cluster's log."""

import json
import os
import signal
import threading
import time
from pathlib import Path

from cluster_support import cluster_env, fpctl, status  # noqa: F401 (cluster_env is a fixture)

from common import events as ev
from controlplane.client import BusClient
from dataplane import LLM, SamplingParams

PROMPT = "the quick brown fox jumps"
TOKENS = 900
STREAMS = 12


def offline_tokens(model, max_tokens: int) -> list[int]:
    with LLM(model, num_stages=1) as llm:
        (output,) = llm.generate([PROMPT], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return output.outputs[0].token_ids


class Streaming:
    """One request streaming from the engine host; ``started`` is set once its first tokens arrived."""

    def __init__(self, env, max_tokens: int) -> None:
        self.address = status(env)["engine_hosts"][0]["request_address"]
        self.max_tokens, self.tokens, self.error = max_tokens, [], None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(60), self.error

    def _run(self) -> None:
        try:
            with BusClient(self.address, timeout_s=120) as client:
                request = client.command(
                    ev.GenerateRequest, pipeline_id="p1", prompt=PROMPT, max_tokens=self.max_tokens, ignore_eos=True
                )
                client.send(request)
                while True:
                    chunk = client.await_reply(request.cmd_id)
                    self.tokens += chunk.token_ids
                    self.started.set()
                    if chunk.finish_reason:
                        return
        except Exception as exc:  # reported by the test
            self.error = exc
            self.started.set()

    def result(self) -> list[int]:
        self.thread.join(180)
        assert self.error is None and not self.thread.is_alive(), self.error
        return self.tokens


def serve_two_stages(env, model, workers: int) -> None:
    """``fpctl up`` with ``workers`` workers, then a READY 2-stage pipeline p1 of ``model``."""
    fpctl(env, "up", "--workers", str(workers))
    assert (
        json.loads(fpctl(env, "deploy", "--model", str(model), "--stages", "2", "--pipeline", "p1", "--json").stdout)[
            "state"
        ]
        == "READY"
    )


def test_plan_split_and_migrate_a_serving_cluster_pipeline(cluster_env, tiny_model):
    env = cluster_env
    serve_two_stages(env, tiny_model, workers=4)
    expected = offline_tokens(tiny_model, TOKENS)

    plan = json.loads(fpctl(env, "plan", "p1", "--stages", "3", "--json").stdout)
    assert plan["outcome"] == "planned" and plan["kind"] == "split" and len(plan["workers"]) == 3
    assert any(m.startswith("KV of layer") for m in plan["moves"]) and plan["weight_bytes_by_source"]
    assert status(env)["pipelines"][0]["epoch"] == 0

    streams = [Streaming(env, TOKENS) for _ in range(STREAMS)]
    split = json.loads(fpctl(env, "refactor", "p1", "--stages", "3", "--json").stdout)
    assert split["outcome"] == "committed" and split["epoch"] == 1, split
    assert set(split["phase_seconds"]) == {"PLAN", "PREPARE", "PRECOPY", "SWITCH", "COMMIT"}
    assert split["kv_bytes"] > 0 and split["weight_bytes"] > 0, split
    assert all(stream.result() == expected for stream in streams)

    (pipeline,) = status(env)["pipelines"]
    assert pipeline["epoch"] == 1 and len(pipeline["stages"]) == 3 and pipeline["state"] == "READY"
    layout = ",".join(f"{s['units'][0]}..{s['units'][-1]}" for s in pipeline["stages"])
    moved_from = pipeline["stages"][1]["worker_id"]

    streams = [Streaming(env, TOKENS) for _ in range(STREAMS)]
    migrate = json.loads(fpctl(env, "refactor", "p1", "--layout", layout, "--migrate", "1", "--json").stdout)
    assert migrate["outcome"] == "committed" and migrate["kind"] == "migrate" and migrate["epoch"] == 2, migrate
    assert migrate["kv_bytes"] > 0, migrate
    assert all(stream.result() == expected for stream in streams)
    (pipeline,) = status(env)["pipelines"]
    assert pipeline["epoch"] == 2 and pipeline["stages"][1]["worker_id"] != moved_from

    refused = fpctl(env, "refactor", "p1", "--stages", "9", "--json", check=False)
    assert refused.returncode == 1 and json.loads(refused.stdout)["outcome"] == "refused"
    assert status(env)["pipelines"][0]["epoch"] == 2

    log = Path(env["FLEXPIPE_RUNTIME_DIR"]) / "cluster.log"
    timelines = json.loads(fpctl(env, "timeline", "--log", str(log), "--json").stdout)
    assert [t["outcome"] for t in timelines] == ["committed", "committed", "refused"]
    assert [t["kind"] for t in timelines[:2]] == ["split", "migrate"]


def test_a_new_worker_that_stops_answering_aborts_the_refactor_and_the_old_layout_keeps_serving(
    cluster_env, tiny_model
):
    env = cluster_env
    serve_two_stages(env, tiny_model, workers=3)
    expected = offline_tokens(tiny_model, TOKENS)
    snapshot = status(env)
    serving = [s["worker_id"] for s in snapshot["pipelines"][0]["stages"]]
    (idle,) = [w for w in snapshot["workers"] if w["worker_id"] not in serving]

    streams = [Streaming(env, TOKENS) for _ in range(4)]
    os.kill(idle["pid"], signal.SIGSTOP)  # alive to the controller until its heartbeats are missed
    try:
        with BusClient(f"ipc://{env['FLEXPIPE_RUNTIME_DIR']}/controller.sock", timeout_s=60) as bus:
            outcome = bus.request(ev.RefactorPipeline, timeout_s=60, pipeline_id="p1", num_stages=3, by="test")
    finally:
        os.kill(idle["pid"], signal.SIGKILL)
    assert outcome.outcome == "aborted" and f"worker {idle['worker_id']} was lost" in outcome.reason, outcome
    assert all(stream.result() == expected for stream in streams), "the old layout served every token"
    (pipeline,) = status(env)["pipelines"]
    assert pipeline["epoch"] == 0 and [s["worker_id"] for s in pipeline["stages"]] == serving
    assert pipeline["state"] == "READY"

    deadline = time.monotonic() + 30
    while next(w for w in status(env)["workers"] if w["worker_id"] == idle["worker_id"])["state"] != "alive":
        assert time.monotonic() < deadline, "the killed worker was not restarted"
        time.sleep(0.2)
    streams = [Streaming(env, TOKENS) for _ in range(4)]
    split = json.loads(fpctl(env, "refactor", "p1", "--stages", "3", "--json").stdout)
    assert split["outcome"] == "committed" and split["epoch"] >= 1, split
    assert all(stream.result() == expected for stream in streams)


def test_a_split_that_needs_a_new_worker_starts_one_and_a_merge_takes_weights_from_the_cache(cluster_env, tiny_model):
    env = cluster_env
    serve_two_stages(env, tiny_model, workers=2)
    expected = offline_tokens(tiny_model, TOKENS)
    streams = [Streaming(env, TOKENS) for _ in range(STREAMS)]

    deadline = time.monotonic() + 30
    while (plan := json.loads(fpctl(env, "plan", "p1", "--stages", "3", "--json").stdout))["kv_bytes"] == 0:
        assert time.monotonic() < deadline, "the plan never saw the KV the running requests hold"
        time.sleep(0.2)
    assert plan["workers"].count("new") == 1 and plan["stall_estimate_s"] > 0, plan

    split = json.loads(fpctl(env, "refactor", "p1", "--stages", "3", "--json").stdout)
    assert split["outcome"] == "committed" and split["epoch"] == 1, split
    assert "worker-2" in split["workers"], "the supervisor started a worker for the new stage"
    merge = json.loads(fpctl(env, "refactor", "p1", "--stages", "2", "--json").stdout)
    assert merge["outcome"] == "committed" and merge["kind"] == "merge" and merge["epoch"] == 2, merge
    assert set(merge["weight_bytes_by_source"]) == {"cache"}, "the units dropped at the split come back from the cache"
    assert merge["weight_bytes"] == merge["weight_bytes_by_source"]["cache"] > 0
    assert all(stream.result() == expected for stream in streams)
    workers = {w["worker_id"]: w["state"] for w in status(env)["workers"]}
    assert workers == {"worker-0": "alive", "worker-1": "alive", "worker-2": "alive"}
