"""fpctl timeline: refactor timelines rebuilt from real JSON log lines, and build_timelines' edge cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from common.logging import configure_logging, emit, get_logger
from controlplane.cli import fpctl
from controlplane.cli.timeline import build_timelines, read_refactor_events

REPO = Path(__file__).resolve().parents[2]
PHASES = {
    "PLAN": (0.002, 0, 0),
    "PREPARE": (0.250, 1 << 20, 0),
    "PRECOPY": (0.120, 0, 4096),
    "SWITCH": (0.008, 0, 512),
    "COMMIT": (0.003, 0, 0),
}


pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def cluster_log(tmp_path) -> Path:
    """A log written through configure_logging/emit: p1#7 commits, p2#8 aborts in PREPARE, p1#9 is refused,
    with a traceback line, another family's event and a partial last line among them."""
    path = tmp_path / "cluster.log"
    with path.open("w") as stream:
        configure_logging("controller", json=True, stream=stream)
        coordinator = get_logger(actor="coordinator")
        p1, p2 = coordinator.bind(pipeline_id="p1"), coordinator.bind(pipeline_id="p2")
        emit(
            p1,
            "refactor.requested",
            epoch=3,
            refactor_id=7,
            kind="split",
            by="policy",
            target=["embed..L1.attn", "L1.mlp..head"],
        )
        for phase, (duration_s, weight_bytes, kv_bytes) in PHASES.items():
            emit(p1, "refactor.phase_started", epoch=4, refactor_id=7, phase=phase)
            time.sleep(0.001)
            emit(
                p1,
                "refactor.phase_finished",
                epoch=4,
                refactor_id=7,
                phase=phase,
                duration_s=duration_s,
                ok=True,
                weight_bytes=weight_bytes,
                kv_bytes=kv_bytes,
            )
            if phase == "PREPARE":
                _abort_p2(p2)
        emit(
            p1,
            "refactor.committed",
            epoch=4,
            refactor_id=7,
            duration_s=0.4,
            stall_s=0.008,
            weight_bytes=1 << 20,
            kv_bytes=4608,
        )
        stream.write('Traceback (most recent call last):\n  File "x.py", line 1\n')
        emit(get_logger(worker_id="w0"), "worker.registered", host="h0")
        emit(p1, "refactor.requested", epoch=4, refactor_id=9, kind="rebalance", by="fpctl", target=[])
        emit(p1, "refactor.refused", level="warning", epoch=4, refactor_id=9, reason="cooldown: 12s left")
        stream.flush()
        stream.write('{"timestamp": "2026-05-09T07:35:25.1')
    return path


def _abort_p2(p2) -> None:
    emit(p2, "refactor.requested", epoch=1, refactor_id=8, kind="merge", by="operator", target=["L0.attn..head"])
    emit(p2, "refactor.phase_started", epoch=2, refactor_id=8, phase="PLAN")
    emit(
        p2,
        "refactor.phase_finished",
        epoch=2,
        refactor_id=8,
        phase="PLAN",
        duration_s=0.001,
        ok=True,
        weight_bytes=0,
        kv_bytes=0,
    )
    emit(p2, "refactor.phase_started", epoch=2, refactor_id=8, phase="PREPARE")
    emit(
        p2,
        "refactor.phase_finished",
        epoch=2,
        refactor_id=8,
        phase="PREPARE",
        duration_s=0.05,
        ok=False,
        weight_bytes=2048,
        kv_bytes=0,
    )
    emit(p2, "refactor.phase_started", epoch=2, refactor_id=8, phase="ABORT")
    emit(
        p2,
        "refactor.phase_finished",
        epoch=2,
        refactor_id=8,
        phase="ABORT",
        duration_s=0.002,
        ok=True,
        weight_bytes=0,
        kv_bytes=0,
    )
    emit(p2, "refactor.aborted", level="warning", epoch=2, refactor_id=8, phase="PREPARE", reason="worker w2 lost")


def run_fpctl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "controlplane.cli.fpctl", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


def pick(timeline: dict, *keys: str) -> tuple:
    return tuple(timeline[key] for key in keys)


def test_fpctl_timeline_json_rebuilds_committed_aborted_and_refused(cluster_log):
    result = run_fpctl("timeline", "--log", str(cluster_log), "--json")
    assert result.returncode == 0, result.stderr
    committed, aborted, refused = json.loads(result.stdout)

    assert pick(committed, "pipeline_id", "refactor_id", "kind", "by") == ("p1", 7, "split", "policy")
    assert pick(committed, "from_epoch", "to_epoch", "outcome") == (3, 4, "committed")
    assert committed["target"] == ["embed..L1.attn", "L1.mlp..head"]
    assert pick(committed, "duration_s", "stall_s", "weight_bytes", "kv_bytes") == (0.4, 0.008, 1 << 20, 4608)
    phases = committed["phases"]
    assert [(p["phase"], p["duration_s"], p["ok"], p["weight_bytes"], p["kv_bytes"]) for p in phases] == [
        (name, d, True, w, k) for name, (d, w, k) in PHASES.items()
    ]
    offsets = [p["offset_s"] for p in phases]
    assert 0 <= offsets[0] and offsets == sorted(offsets) and offsets[-1] > offsets[0]
    assert datetime.fromisoformat(committed["started_at"].replace("Z", "+00:00")).tzinfo is not None

    assert pick(aborted, "pipeline_id", "refactor_id", "outcome") == ("p2", 8, "aborted")
    assert pick(aborted, "aborted_in", "reason", "stall_s") == ("PREPARE", "worker w2 lost", None)
    assert [(p["phase"], p["ok"]) for p in aborted["phases"]] == [("PLAN", True), ("PREPARE", False), ("ABORT", True)]
    assert pick(aborted, "from_epoch", "to_epoch", "weight_bytes", "kv_bytes") == (1, 2, 2048, 0)
    assert aborted["duration_s"] >= 0

    assert pick(refused, "pipeline_id", "refactor_id", "kind", "outcome") == ("p1", 9, "rebalance", "refused")
    assert pick(refused, "reason", "phases", "from_epoch", "to_epoch") == ("cooldown: 12s left", [], 4, 5)
    assert committed["started_at"] <= aborted["started_at"] <= refused["started_at"]


def test_fpctl_timeline_reads_standard_input_and_filters_by_pipeline(cluster_log):
    result = run_fpctl("timeline", "--pipeline", "p2", "--json", stdin=cluster_log.read_text())
    assert result.returncode == 0, result.stderr
    assert [(t["pipeline_id"], t["refactor_id"]) for t in json.loads(result.stdout)] == [("p2", 8)]


def test_fpctl_timeline_missing_file_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "no-such.log"
    result = run_fpctl("timeline", "--log", str(missing))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"fpctl: cannot read log {missing}: No such file or directory"]


def test_fpctl_timeline_table_for_people(cluster_log, capsys):
    assert fpctl.main(["timeline", "--log", str(cluster_log)]) == 0
    text = " ".join(capsys.readouterr().out.split())  # captions wrap at the console's width
    assert "p1 refactor 7: split epoch 3 -> 4, committed" in text
    assert "p2 refactor 8: merge epoch 1 -> 2, aborted" in text and "worker w2 lost" in text
    assert all(phase in text for phase in PHASES) and "stall 8 ms" in text


def test_fpctl_timeline_says_when_the_log_has_no_refactor(tmp_path, capsys):
    (tmp_path / "quiet.log").write_text('{"event": "worker.registered"}\nplain text\n')
    assert fpctl.main(["timeline", "--log", str(tmp_path / "quiet.log")]) == 0
    assert "no refactors in the log" in capsys.readouterr().out


# ---- read_refactor_events and build_timelines, fed hand-made events ---------------------------

T0 = datetime(2026, 5, 9, 7, 35, 25, tzinfo=timezone.utc)


def line(name: str, at_s: float | None, **fields) -> dict:
    stamp = {} if at_s is None else {"timestamp": (T0 + timedelta(seconds=at_s)).isoformat().replace("+00:00", "Z")}
    return {**stamp, "level": "info", "event": name, "process": "controller", "pid": 1, **fields}


def test_read_refactor_events_keeps_only_refactor_objects():
    wanted = line("refactor.refused", 0, pipeline_id="p1", reason="busy")
    lines = [
        "",
        "null",
        "[1, 2]",
        "{not json",
        '{"event": 3}',
        json.dumps(line("worker.lost", 0)),
        "2026-05-09 07:35:25 [info] refactor.requested pipeline_id=p1",
        json.dumps(wanted) + "\n",
    ]
    assert read_refactor_events(lines) == [wanted]


def test_unfinished_phase_has_no_duration_and_refactor_stays_in_progress():
    [t] = build_timelines(
        [
            line("refactor.requested", 0.0, pipeline_id="p1", epoch=3, refactor_id=1, kind="split"),
            line("refactor.phase_started", 0.5, pipeline_id="p1", epoch=4, refactor_id=1, phase="PLAN"),
            line("refactor.phase_finished", 0.6, pipeline_id="p1", epoch=4, refactor_id=1, phase="PLAN", ok=True),
            line("refactor.phase_started", 1.0, pipeline_id="p1", epoch=4, refactor_id=1, phase="PRECOPY"),
        ]
    )
    assert (t.outcome, t.duration_s, t.started_at, t.from_epoch, t.to_epoch) == ("in progress", None, T0, 3, 4)
    plan, precopy = t.phases
    assert (plan.offset_s, round(plan.duration_s, 6), plan.ok) == (0.5, 0.1, True)  # duration from the timestamps
    assert (precopy.phase, precopy.offset_s, precopy.duration_s, precopy.ok) == ("PRECOPY", 1.0, None, None)


def test_missing_refactor_id_groups_by_pipeline_and_target_epoch():
    timelines = build_timelines(
        [
            line("refactor.requested", 0.0, pipeline_id="p1", epoch=3, kind="merge"),
            line("refactor.phase_started", 0.1, pipeline_id="p1", epoch=4, phase="SWITCH"),
            line("refactor.phase_finished", 0.2, pipeline_id="p1", epoch=4, phase="SWITCH", duration_s=0.05),
            line("refactor.requested", 0.3, pipeline_id="p1", epoch=3, kind="split"),
            line("refactor.refused", 0.3, pipeline_id="p1", epoch=3, reason="a refactor is running"),
            line("refactor.committed", 0.4, pipeline_id="p1", epoch=4, stall_s=0.05),
            line("refactor.requested", 1.0, pipeline_id="p1", epoch=4, kind="rebalance"),
            line("refactor.phase_started", 1.1, pipeline_id="p1", epoch=5, phase="PLAN"),
        ]
    )
    assert [(t.kind, t.from_epoch, t.to_epoch, t.outcome, t.refactor_id) for t in timelines] == [
        ("merge", 3, 4, "committed", None),
        ("split", 3, 4, "refused", None),
        ("rebalance", 4, 5, "in progress", None),
    ]
    merge = timelines[0]
    assert ([p.phase for p in merge.phases], merge.stall_s, round(merge.duration_s, 6)) == (["SWITCH"], 0.05, 0.4)


def test_two_pipelines_interleaved_with_the_same_refactor_id_are_ordered_by_start():
    timelines = build_timelines(
        [
            line("refactor.phase_started", 0.2, pipeline_id="p2", epoch=8, refactor_id=1, phase="PREPARE"),
            line("refactor.requested", 0.1, pipeline_id="p1", epoch=1, refactor_id=1, kind="migrate"),
            line("refactor.phase_started", 0.3, pipeline_id="p1", epoch=2, refactor_id=1, phase="PREPARE"),
            line(
                "refactor.phase_finished",
                0.4,
                pipeline_id="p2",
                epoch=8,
                refactor_id=1,
                phase="PREPARE",
                duration_s=0.2,
                ok=True,
                weight_bytes=10,
                kv_bytes=0,
            ),
            line(
                "refactor.phase_finished",
                0.5,
                pipeline_id="p1",
                epoch=2,
                refactor_id=1,
                phase="PREPARE",
                duration_s=0.2,
                ok=True,
                weight_bytes=30,
                kv_bytes=5,
            ),
            line("refactor.aborted", 0.6, pipeline_id="p2", epoch=8, refactor_id=1, phase="PRECOPY", reason="lost w1"),
            line("refactor.committed", 0.7, pipeline_id="p1", epoch=2, refactor_id=1, duration_s=0.6, stall_s=0.01),
        ]
    )
    p1, p2 = timelines
    assert (p1.pipeline_id, p1.outcome, p1.kind, p1.weight_bytes, p1.kv_bytes) == ("p1", "committed", "migrate", 30, 5)
    assert (p2.pipeline_id, p2.outcome, p2.from_epoch, p2.to_epoch, p2.weight_bytes) == ("p2", "aborted", 7, 8, 10)
    assert p1.phases[0].offset_s == pytest.approx(0.2) and p2.phases[0].offset_s == 0.0
    assert p2.to_dict()["started_at"] == "2026-05-09T07:35:25.200000Z"


def test_finish_without_start_retry_reused_id_and_missing_timestamps():
    timelines = build_timelines(
        [
            line(
                "refactor.phase_finished", 2.0, pipeline_id="p1", epoch=2, refactor_id=4, phase="COPY", duration_s=0.5
            ),
            line("refactor.phase_started", 2.1, pipeline_id="p1", epoch=2, refactor_id=4, phase="COPY"),
            line(
                "refactor.phase_finished", 2.4, pipeline_id="p1", epoch=2, refactor_id=4, phase="COPY", duration_s=0.3
            ),
            line("refactor.committed", 2.5, pipeline_id="p1", epoch=2, refactor_id=4),
            line("refactor.requested", None, pipeline_id="p1", epoch=2, refactor_id=4, kind="split"),
            line("refactor.requested", 0.0, pipeline_id="p1", epoch="two", refactor_id=True, kind=5, target="L0..L3"),
        ]
    )
    garbled, first, reused = timelines
    assert (garbled.refactor_id, garbled.kind, garbled.from_epoch, garbled.target) == (None, None, None, ["L0..L3"])
    assert [(p.offset_s, p.duration_s) for p in first.phases] == [(0.0, 0.5), (pytest.approx(0.6), 0.3)]
    assert (first.started_at, first.outcome, first.from_epoch) == (T0 + timedelta(seconds=1.5), "committed", 1)
    assert first.duration_s == pytest.approx(1.0)  # from the derived start to the committed line
    assert (reused.kind, reused.started_at, reused.outcome, reused.to_epoch) == ("split", None, "in progress", 3)


def test_coordinator_order_plan_before_request_refusal_after_plan_and_queued_lines():
    """The coordinator logs PLAN's start before the request line, refuses a request whose PLAN
    failed, and logs queued requests without an id: those lines belong to no timeline."""
    timelines = build_timelines(
        [
            line("refactor.phase_started", 0.0, pipeline_id="p1", epoch=1, refactor_id=1, phase="PLAN"),
            line("refactor.requested", 0.0, pipeline_id="p1", epoch=0, refactor_id=1, kind="split", by="fpctl"),
            line(
                "refactor.phase_finished", 0.0, pipeline_id="p1", epoch=1, refactor_id=1, phase="PLAN", duration_s=0.0
            ),
            line("refactor.phase_started", 0.0, pipeline_id="p1", epoch=1, refactor_id=1, phase="PREPARE"),
            line("refactor.queued", 0.1, pipeline_id="p1", epoch=0, position=1),
            line("refactor.phase_started", 0.2, pipeline_id="p1", epoch=1, refactor_id=2, phase="PLAN"),
            line("refactor.refused", 0.2, pipeline_id="p1", epoch=0, refactor_id=2, reason="no device fits"),
        ]
    )
    running, refused = timelines
    assert (running.refactor_id, running.kind, running.from_epoch, running.to_epoch) == (1, "split", 0, 1)
    assert [(p.phase, p.duration_s) for p in running.phases] == [("PLAN", 0.0), ("PREPARE", None)]
    assert (refused.refactor_id, refused.outcome, refused.reason, [p.phase for p in refused.phases]) == (
        2,
        "refused",
        "no device fits",
        ["PLAN"],
    )
