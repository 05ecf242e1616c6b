"""Structured logging: JSON and console lines, the event catalogue, stdlib routing, env overrides."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import warnings
from datetime import datetime
from pathlib import Path

import pytest

from common.config import ConfigError
from common.logging import LOG_EVENTS, configure_logging, emit, get_logger, log_events_markdown

DOCS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "log-events.md"


pytestmark = pytest.mark.usefixtures("restore_logging")


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_header_bound_and_call_fields():
    stream = io.StringIO()
    configure_logging("controller", json=True, stream=stream)
    log = get_logger(actor="coordinator", pipeline_id="p1", epoch=3)
    emit(log, "refactor.phase_finished", phase="SWITCH", duration_s=0.008)
    [line] = json_lines(stream)
    assert list(line)[:5] == ["timestamp", "level", "event", "process", "pid"]
    assert line["level"] == "info" and line["event"] == "refactor.phase_finished"
    assert line["process"] == "controller" and line["pid"] == os.getpid()
    assert (line["actor"], line["pipeline_id"], line["epoch"]) == ("coordinator", "p1", 3)
    assert (line["phase"], line["duration_s"]) == ("SWITCH", 0.008)
    timestamp = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
    assert timestamp.utcoffset().total_seconds() == 0


def test_non_terminal_stream_defaults_to_json():
    stream = io.StringIO()
    configure_logging("worker", stream=stream)
    emit(get_logger(), "worker.registered", worker_id="w0")
    assert json_lines(stream)[0]["worker_id"] == "w0"


def test_console_mode_writes_human_text():
    stream = io.StringIO()
    configure_logging("worker", json=False, stream=stream)
    emit(get_logger(worker_id="w0"), "stage.loaded", stage=1)
    text = stream.getvalue()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert "stage.loaded" in text and "worker_id=w0" in text and "stage=1" in text
    assert "\x1b[" not in text  # no colour codes away from a terminal


def test_unknown_event_name_raises_and_logs_nothing():
    stream = io.StringIO()
    configure_logging("controller", json=True, stream=stream)
    with pytest.raises(ValueError, match="refactor.comitted"):
        emit(get_logger(), "refactor.comitted")
    with pytest.raises(ValueError, match="loud"):
        emit(get_logger(), "refactor.committed", level="loud")
    assert stream.getvalue() == ""


def test_level_threshold_and_level_field():
    stream = io.StringIO()
    configure_logging("controller", level="warning", json=True, stream=stream)
    log = get_logger()
    emit(log, "worker.heartbeat_late", worker_id="w0")
    emit(log, "worker.lost", level="warning", worker_id="w0")
    [line] = json_lines(stream)
    assert (line["event"], line["level"]) == ("worker.lost", "warning")


def test_stdlib_records_and_warnings_use_the_same_json_format():
    stream = io.StringIO()
    configure_logging("engine_host", json=True, stream=stream)
    logging.getLogger("some.library").warning("disk %s is slow", "sda")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old parameter", DeprecationWarning, stacklevel=1)
    library, warning = json_lines(stream)
    assert library["event"] == "disk sda is slow" and library["logger"] == "some.library"
    assert library["level"] == "warning" and library["process"] == "engine_host" and library["pid"] == os.getpid()
    assert "timestamp" in library
    assert warning["logger"] == "py.warnings" and "DeprecationWarning: old parameter" in warning["event"]


def test_exception_traceback_is_a_json_field():
    stream = io.StringIO()
    configure_logging("controller", json=True, stream=stream)
    try:
        raise RuntimeError("actor bug")
    except RuntimeError:
        emit(get_logger(actor="monitor"), "actor.failed", level="error", exc_info=True)
    [line] = json_lines(stream)
    assert line["level"] == "error" and "RuntimeError: actor bug" in line["exception"]


def test_field_named_like_header_is_kept_only_when_it_differs():
    stream = io.StringIO()
    configure_logging("supervisor", json=True, stream=stream)
    log = get_logger(process="supervisor")
    emit(log, "process.started", child="worker-0", pid=os.getpid() + 1)
    emit(log, "controller.started", pid=os.getpid())
    child, own = json_lines(stream)
    assert child["pid"] == os.getpid() and child["subject_pid"] == os.getpid() + 1
    assert child["process"] == "supervisor" and "subject_process" not in child
    assert "subject_pid" not in own


def test_reconfiguring_reaches_loggers_made_earlier():
    first, second = io.StringIO(), io.StringIO()
    configure_logging("worker", json=True, stream=first)
    early = get_logger(worker_id="w0")
    bound_early = early.bind(epoch=1)
    configure_logging("controller", json=True, stream=second)
    emit(early, "worker.registered")
    emit(bound_early, "worker.reregistered")
    assert first.getvalue() == ""
    lines = json_lines(second)
    assert [line["process"] for line in lines] == ["controller", "controller"]
    assert lines[1]["epoch"] == 1
    assert sum(isinstance(h, logging.StreamHandler) and h.stream is first for h in logging.getLogger().handlers) == 0


def test_environment_overrides_format_and_level(monkeypatch):
    monkeypatch.setenv("FLEXPIPE_LOG_FORMAT", "console")
    monkeypatch.setenv("FLEXPIPE_LOG_LEVEL", "ERROR")
    stream = io.StringIO()
    configure_logging("worker", level="debug", json=True, stream=stream)
    emit(get_logger(), "stage.loading")
    emit(get_logger(), "stage.load_failed", level="error", error="no such file")
    text = stream.getvalue()
    assert "stage.loading" not in text and "stage.load_failed" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)

    monkeypatch.setenv("FLEXPIPE_LOG_FORMAT", "json")
    monkeypatch.delenv("FLEXPIPE_LOG_LEVEL")
    stream = io.StringIO()
    configure_logging("worker", json=False, stream=stream)
    emit(get_logger(), "stage.loading")
    assert json_lines(stream)[0]["event"] == "stage.loading"


@pytest.mark.parametrize("name, value", [("FLEXPIPE_LOG_FORMAT", "xml"), ("FLEXPIPE_LOG_LEVEL", "chatty")])
def test_bad_environment_values_are_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=value):
        configure_logging("worker", stream=io.StringIO())


def test_catalogue_names_are_dotted_lower_case_with_one_line_meanings():
    for name, meaning in LOG_EVENTS.items():
        assert re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", name), name
        assert meaning and "\n" not in meaning, name


def test_docs_page_lists_exactly_the_catalogue():
    page = DOCS_PAGE.read_text()
    assert page == log_events_markdown(), "regenerate: python -m common.logging --markdown > docs/log-events.md"
    documented = re.findall(r"^\| `([a-z_.]+)` \|", page, flags=re.MULTILINE)
    assert documented == list(LOG_EVENTS)
