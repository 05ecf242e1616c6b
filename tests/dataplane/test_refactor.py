"""Inflight refactoring of a live offline pipeline: split, merge, rebalance and migrate while
requests stream, with KV carried across; faults abort and the old layout keeps serving."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from common.errors import RefactorAborted, RefactorRefused
from common.logging import configure_logging
from dataplane.engine.sampling_params import SamplingParams
from dataplane.llm import LLM

REBALANCE = ["embed..L0.attn", "L0.mlp..L1.attn", "L1.mlp..head"]


def workload(seed: int = 0, count: int = 64, temperature: float = 0.0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randrange(3, 60))] for _ in range(count)]
    params = [
        SamplingParams(
            max_tokens=rng.randrange(64, 129),
            temperature=temperature,
            ignore_eos=True,
            seed=rng.randrange(1 << 30) if temperature else None,
        )
        for _ in prompts
    ]
    return prompts, params


class Traffic:
    """Two staggered streams of the same 64-request wave, so requests are always mid-generation."""

    def __init__(self, llm: LLM, prompts, params) -> None:
        self.llm, self.prompts, self.params = llm, prompts, params
        self.results: list[list[list[int]]] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i * 0.15,), daemon=True) for i in range(2)]

    def _run(self, delay: float) -> None:
        time.sleep(delay)
        while not self.stop.is_set():
            try:
                outputs = self.llm.generate(self.prompts, self.params, timeout_s=120)
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)
                return
            self.results.append([o.token_ids for o in outputs])

    def wait_running(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.llm.engine.call(lambda: len(self.llm.engine.scheduler.running)) == 0:
            assert time.monotonic() < deadline, "no request got running"
            time.sleep(0.005)

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(180)
        assert not any(t.is_alive() for t in self.threads)


def refactor_while_streaming(llm: LLM, prompts, params, steps):
    reference = [o.token_ids for o in llm.generate(prompts, params)]
    free_at_start = llm.num_free_kv_blocks()
    reports = []
    with Traffic(llm, prompts, params) as traffic:
        for step in steps:
            traffic.wait_running()
            reports.append(llm.refactor(**step))
    assert not traffic.errors, traffic.errors
    assert len(traffic.results) >= 2
    for result in traffic.results:
        assert result == reference
    assert all(len(tokens) == p.max_tokens for tokens, p in zip(reference, params))
    assert llm.num_free_kv_blocks() == free_at_start
    return reports


@pytest.mark.parametrize("model", ["tiny", "qwen2"])
def test_split_merge_rebalance_migrate_while_streaming_keep_every_token(model, tiny_model, checkpoint):
    model_dir = tiny_model if model == "tiny" else checkpoint("qwen2")
    prompts, params = workload()
    steps = [
        dict(num_stages=4),
        dict(num_stages=1),
        dict(num_stages=3),
        dict(layout=REBALANCE),
        dict(layout=REBALANCE, migrate=[1]),
    ]
    with LLM(model_dir, num_stages=2, spare_workers=2) as llm:
        reports = refactor_while_streaming(llm, prompts, params, steps)
        assert [r.kind for r in reports] == ["split", "merge", "split", "rebalance", "migrate"]
        assert [len(r.new_layout) for r in reports] == [4, 1, 3, 3, 3]
        assert [r.epoch for r in reports] == [1, 2, 3, 4, 5]
        assert llm.stage_layout == REBALANCE and llm.epoch == 5
        assert reports[-1].workers[1] != reports[-2].workers[1]
        assert reports[-1].workers[0] == reports[-2].workers[0]
        for report in reports:
            assert report.outcome == "committed" and report.requests_carried > 0
            assert report.kv_bytes == report.kv_bytes_precopy + report.kv_bytes_delta
            assert (report.kv_bytes_precopy > 0) == bool(report.kv_layers_moved), report
            # how much of the KV the pre-copy moves ahead of SWITCH depends on timing: scripts/bench/refactor.py
            assert set(report.weight_bytes_by_source) <= {"cache", "peer", "disk"}
            assert set(report.phase_seconds) == {"PLAN", "PREPARE", "PRECOPY", "SWITCH", "COMMIT"}
        assert sum(bool(r.kv_layers_moved) for r in reports) >= 4
        assert "peer" in reports[0].weight_bytes_by_source
        assert "cache" in reports[2].weight_bytes_by_source


def test_seeded_sampling_is_the_same_with_refactors(tiny_model):
    prompts, params = workload(seed=1, count=32, temperature=0.8)
    with LLM(tiny_model, num_stages=2, spare_workers=2) as llm:
        refactor_while_streaming(llm, prompts, params, [dict(num_stages=3), dict(num_stages=1), dict(layout=REBALANCE)])


def test_a_second_refactor_waits_for_the_first(tiny_model):
    prompts, params = workload(count=32)
    with LLM(tiny_model, num_stages=2, spare_workers=2) as llm, Traffic(llm, prompts, params) as traffic:
        traffic.wait_running()
        first: dict = {}
        thread = threading.Thread(target=lambda: first.setdefault("report", llm.refactor(num_stages=3)))
        thread.start()
        while llm.refactor_status() is None and thread.is_alive():
            time.sleep(0.001)
        second = llm.refactor(num_stages=2)
        thread.join(60)
        assert first["report"].epoch == 1 and second.epoch == 2
        assert len(llm.stage_layout) == 2


def killed_during(llm: LLM, phase: str, refactor_kwargs: dict) -> RefactorAborted:
    """Start a refactor, SIGKILL a worker that only the target layout uses once ``phase`` runs."""
    serving = set(llm.worker_pids[: len(llm.stage_layout)])
    caught: dict = {}

    def run():
        try:
            llm.refactor(**refactor_kwargs)
        except RefactorAborted as exc:
            caught["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    victim = None
    while victim is None:
        assert time.monotonic() < deadline and thread.is_alive(), f"never saw {phase}"
        status = llm.refactor_status()
        if phase == "PREPARE":
            fresh = [pid for pid in llm.worker_pids if pid not in serving]
            victim = fresh[0] if fresh else None
        elif status and status["phase"] == phase:
            victim = next(pid for pid in status["worker_pids"] if pid not in serving)
        time.sleep(0.001)
    os.kill(victim, signal.SIGKILL)
    thread.join(120)
    assert "error" in caught, "the refactor was not aborted"
    return caught["error"]


@pytest.mark.parametrize("phase", ["PREPARE", "PRECOPY"])
def test_a_new_worker_killed_mid_refactor_aborts_and_the_old_layout_keeps_serving(phase, tiny_model):
    prompts, params = workload(count=48)
    with LLM(tiny_model, num_stages=2, spare_workers=0 if phase == "PREPARE" else 1) as llm:
        reference = [o.token_ids for o in llm.generate(prompts, params)]
        free_at_start = llm.num_free_kv_blocks()
        layout_before = llm.stage_layout
        with Traffic(llm, prompts, params) as traffic:
            traffic.wait_running()
            error = killed_during(llm, phase, dict(num_stages=3, precopy_bytes_per_s=2000.0))
            assert f"{phase} failed" in str(error) and "exited" in str(error)
            assert error.report is not None and error.report.outcome == "aborted"
            assert llm.stage_layout == layout_before and llm.epoch == 0
        assert not traffic.errors, traffic.errors
        assert traffic.results and all(result == reference for result in traffic.results)
        assert llm.num_free_kv_blocks() == free_at_start
        report = llm.refactor(num_stages=3)
        assert report.epoch == 1
        assert [o.token_ids for o in llm.generate(prompts, params)] == reference


def test_a_target_that_cannot_fit_is_refused_before_anything_moves(tiny_model):
    prompts, params = workload(count=8)
    with LLM(tiny_model, num_stages=2) as llm:
        whole = llm.plan_refactor(num_stages=1)["stage_memory"][0]
        llm.worker_memory = whole - 1
        pids = list(llm.worker_pids)
        with pytest.raises(RefactorRefused, match="needs .* bytes"):
            llm.refactor(num_stages=1)
        with pytest.raises(RefactorRefused, match="already serves"):
            llm.refactor(layout=llm.stage_layout)
        with pytest.raises(RefactorRefused, match="bad target layout"):
            llm.refactor(layout=["embed..L0.attn", "L2.mlp..head"])
        assert llm.worker_pids == pids and llm.epoch == 0 and len(llm.stage_layout) == 2
        assert len(llm.generate(prompts, params)) == 8


def test_plan_refactor_shows_what_would_move_without_moving_it(tiny_model):
    with LLM(tiny_model, num_stages=2) as llm:
        plan = llm.plan_refactor(num_stages=4)
        assert plan["kind"] == "split" and len(plan["to"]) == 4 and plan["workers"].count("new") == 2
        assert plan["weight_bytes_by_source"].get("peer", 0) > 0
        assert plan["kv_layers_moving"] and plan["stall_estimate_s"] >= 0
        assert llm.epoch == 0 and len(llm.worker_pids) == 2


@pytest.mark.usefixtures("restore_logging")
def test_the_timeline_is_rebuilt_from_the_log(tiny_model, tmp_path):
    log_file = tmp_path / "flexpipe.log"
    with open(log_file, "w") as stream:
        configure_logging("offline", json=True, stream=stream)
        with LLM(tiny_model, num_stages=2, spare_workers=1) as llm:
            llm.refactor(num_stages=3)
            with pytest.raises(RefactorRefused):
                llm.refactor(num_stages=3)
    result = subprocess.run(
        [sys.executable, "-m", "controlplane.cli.fpctl", "timeline", "--log", str(log_file), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    committed, refused = json.loads(result.stdout)
    assert committed["outcome"] == "committed" and committed["kind"] == "split" and committed["to_epoch"] == 1
    assert [p["phase"] for p in committed["phases"]] == ["PLAN", "PREPARE", "PRECOPY", "SWITCH", "COMMIT"]
    assert all(p["duration_s"] is not None for p in committed["phases"])
    assert refused["outcome"] == "refused" and "already serves" in refused["reason"]


@pytest.mark.usefixtures("restore_logging")
def test_stall_is_one_quantity_in_the_report_the_outcome_and_the_timeline(tiny_model, tmp_path, monkeypatch):
    from common import events as ev
    from dataplane.llm.in_process import InProcessCluster

    outcomes = []
    request = InProcessCluster.request

    def recording(self, cls, timeout_s, **fields):
        reply = request(self, cls, timeout_s, **fields)
        if isinstance(reply, ev.RefactorOutcome):
            outcomes.append(reply)
        return reply

    monkeypatch.setattr(InProcessCluster, "request", recording)
    log_file = tmp_path / "flexpipe.log"
    prompts, params = workload(count=16)
    with open(log_file, "w") as stream:
        configure_logging("offline", json=True, stream=stream)
        with LLM(tiny_model, num_stages=2, spare_workers=1) as llm, Traffic(llm, prompts, params) as traffic:
            traffic.wait_running()
            report = llm.refactor(num_stages=3)
    (outcome,) = outcomes
    result = subprocess.run(
        [sys.executable, "-m", "controlplane.cli.fpctl", "timeline", "--log", str(log_file), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    (timeline,) = json.loads(result.stdout)
    resumed = [json.loads(line) for line in log_file.read_text().splitlines() if '"engine.resumed"' in line]
    assert report.stall_s == outcome.stall_s == timeline["stall_s"] == resumed[-1]["stall_s"] > 0
    assert outcome.switch.stall_s == report.stall_s, "measured on the engine: drained pipeline to resume"
    assert 0 < report.stall_s <= report.switch_s == outcome.switch_s, "SWITCH adds the drain to the stall"
    assert report.switch_window[1] - report.switch_window[0] == pytest.approx(report.switch_s)
