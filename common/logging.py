"""FlexPipe's structured logging: one catalogue of event names, one line per event.

Every FlexPipe process calls ``configure_logging(<process name>)`` once at start-up (again
to reconfigure), takes loggers from ``get_logger(**bound)`` and logs with
``emit(logger, "<catalogued name>", **fields)``. Lines are JSON when the stream is not a
terminal, structlog's console rendering when it is; stdlib ``logging`` records and Python
warnings go through the same renderer. ``python -m common.logging --markdown`` prints the
catalogue page kept as ``docs/log-events.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import structlog

from common.config import ConfigError

LOG_EVENTS: dict[str, str] = {
    "process.started": "a supervised child process was spawned (`child`, `subject_pid`)",
    "process.ready": "a process finished start-up and serves; from a supervisor: all its children are ready",
    "process.exited": "a process exited (`child`, `exit_code`) or gave up with an error (`reason`)",
    "process.restarted": "a child that exited was started again (`child`, `restarts`)",
    "process.restart_limit": "a child exhausted its restart limit and stays down",
    "process.stopping": "an orderly shutdown began (`reason`), or a supervisor is stopping `child`",
    "config.loaded": "the configuration in effect (`path`, environment overrides applied)",
    "controller.started": "the controller's actors run and its endpoints accept peers (`endpoints`)",
    "controller.stopped": "the controller closed its endpoints and stopped its actors",
    "actor.failed": "an actor raised while handling an event; the event is dropped, the actor keeps running",
    "bus.listening": "a control-bus endpoint is bound (`endpoint`, `curve`)",
    "bus.connected": "this process connected to a control-bus endpoint (`endpoint`)",
    "bus.message_rejected": "a malformed, unknown, oversized, wrong-version or out-of-order message was refused (`code`, `peer`)",
    "bus.peer_denied": "a peer failed CURVE authentication and got nothing (`address`, `reason`)",
    "bus.insecure": "a loopback TCP endpoint runs without CURVE",
    "bus.no_route": "an event addressed a peer or actor with no known route and was dropped",
    "bus.send_failed": "a message to a peer could not be sent (peer gone or queue full) and was dropped",
    "bus.reply_timeout": "a command got no reply within its timeout (`peer`, `cmd_id`)",
    "worker.registered": "a worker joined with its devices (`worker_id`, `host`)",
    "worker.reregistered": "a known worker registered again, e.g. after a restart (`old_pid`)",
    "worker.lost": "a worker missed enough heartbeats, or its supervisor saw it exit (`reason`): it is lost, its stages are gone",
    "worker.heartbeat_late": "a worker's heartbeat is overdue but it is not yet lost",
    "worker.metrics": "a worker's periodic metrics (queues, busy fraction, memory, KV usage)",
    "engine_host.registered": "an engine host joined (`host_id`, `request_address`, `http_address` of its gateway)",
    "engine_host.lost": "an engine host missed enough heartbeats to be declared lost",
    "monitor.congestion": "a stage's input queue grew in each of the policy's last intervals (`pipeline_id`, `stage`, `queue`: lengths, oldest first)",
    "policy.decided": "the policy issued a change (`seq`, `kind`: granularity, scale_out, scale_in, rebalance; `action`, `arrival_rate`, `cv`, `trend`, `queues`, `scores` per stage count)",
    "policy.held": "the policy wanted a change the cluster cannot place, and did nothing (`seq`, `action`, `reason`)",
    "policy.outcome": "a change the policy issued ended (`seq`, `outcome`: committed, ready, removed, refused, failed; `duration_s`, `reason`)",
    "policy.paused": "an operator paused the policy: it decides nothing until resumed; changes in progress finish",
    "policy.resumed": "an operator resumed the policy",
    "allocator.placed": "the allocator placed a pipeline's stages on devices (`placement`, `duration_s`)",
    "allocator.refused": "no placement fits the request (`reason`)",
    "pipeline.deploy_requested": "an operator or the policy asked to deploy a pipeline (`model_dir`, `stages`)",
    "pipeline.state": "a pipeline changed state (`state`: LOADING, SERVING, DEGRADED, FAILED, REFUSED, ...)",
    "pipeline.undeployed": "a pipeline was removed and its stages unloaded",
    "stage.loading": "a worker started loading a stage's units (`stage`, `units`)",
    "stage.loaded": "a stage's weights and KV pool are ready (`stage`, `source`, `duration_s`)",
    "stage.load_failed": "a stage could not be loaded (`stage`, `error`)",
    "stage.unloaded": "a worker dropped a stage's units",
    "stage.batch_failed": "a micro-batch raised inside a stage; its requests fail",
    "stage.epoch_prepared": "a worker built the stage it will serve at a new epoch (`stage`, `sources`, `seconds`)",
    "stage.epoch_activated": "a worker serves the stage of a new epoch (`epoch`)",
    "stage.epoch_settled": "a worker committed or aborted an epoch (`outcome`, `cached_units`)",
    "stage.message_unreadable": "a data message could not be read (e.g. its shared-memory ring is gone) and was dropped; the epoch being prepared fails (`reason`)",
    "stage.epoch_failed": "acknowledged epoch work on a worker failed: a KV send, a stage built from received weights (`reason`)",
    "engine.started": "an engine began serving a pipeline replica",
    "engine.stopped": "an engine stopped; requests still pending were failed",
    "engine.paused": "an engine stopped launching and drained its micro-batches (`running`, `seconds`)",
    "engine.resumed": "a paused engine feeds the pipeline again, maybe a new first stage at a new epoch (`epoch`, `stall_s`, `switch_s`)",
    "engine.draining": "an engine takes no new requests (the policy removes its replica once the running ones finish)",
    "engine.kv_exhausted": "no free KV blocks; new requests wait until blocks free up",
    "engine.message_dropped": "an engine dropped a malformed or unmatched reply from a stage",
    "gateway.listening": "the HTTP front end is bound (`address`)",
    "request.started": "a request was admitted (`seq_id`, `prompt_tokens`)",
    "request.finished": "a request completed (`finish_reason`, `output_tokens`, `ttft_s`, `duration_s`)",
    "request.failed": "a request ended with an error (`error`)",
    "request.rejected": "a request was refused before admission (`reason`)",
    "request.aborted": "a request was stopped because its caller gave up (`seq_id`, `reason`, `output_tokens`)",
    "transport.failed": "a data-plane channel broke (`transport`, `peer`, `error`)",
    "refactor.requested": "a layout change was asked for (`kind`: split, merge, rebalance, migrate; `by`)",
    "refactor.phase_started": "a refactor phase began (`phase`: PLAN, PREPARE, PRECOPY, SWITCH, COMMIT)",
    "refactor.phase_finished": "a refactor phase ended (`phase`, `duration_s`)",
    "refactor.committed": "the new layout serves at the new epoch (`duration_s`, `stall_s`)",
    "refactor.aborted": "a refactor was abandoned before SWITCH; the old layout still serves (`phase`, `reason`)",
    "refactor.refused": "a refactor request was not started (`reason`)",
    "refactor.queued": "a refactor request waits for the pipeline's running refactor to end (`position`)",
    "keys.generated": "CURVE key pairs were written (`key_dir`)",
}

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

HEADER_KEYS = ("timestamp", "level", "event", "process", "pid")


@dataclass(slots=True)
class _ProcessIdentity:
    """Who is logging. Invariant: one per interpreter, renamed by each ``configure_logging``."""

    name: str = ""


_identity = _ProcessIdentity()
_handler: logging.Handler | None = None


def configure_logging(
    process: str, *, level: str = "info", json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Send structlog events, stdlib ``logging`` records and Python warnings, one line each, to ``stream``.

    ``stream`` defaults to ``sys.stderr``. Lines are JSON when ``json`` is True, or when it
    is None and ``stream`` is not a terminal; otherwise console text. ``FLEXPIPE_LOG_FORMAT``
    (``json`` | ``console``) and ``FLEXPIPE_LOG_LEVEL`` override the arguments. Calling it
    again replaces the previous configuration, including for loggers already bound.
    Raises ``ConfigError`` for an unknown level or format.
    """
    env_level, env_json = _environment_overrides()
    level_number = _level_number(env_level or level)
    stream = sys.stderr if stream is None else stream
    as_json = _wants_json(json if env_json is None else env_json, stream)
    _identity.name = process
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.contextvars.merge_contextvars,
            _keep_colliding_fields,
            *_header_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=False,
    )
    _install_handler(stream, _formatter(as_json, stream), level_number)
    logging.captureWarnings(True)


def get_logger(**bound: Any) -> Any:
    """A structlog logger carrying ``bound`` on every line (e.g. ``actor``, ``pipeline_id``, ``epoch``).

    It follows the current configuration on every call, even one made before
    ``configure_logging``.
    """
    return structlog.get_logger("flexpipe", **bound)


def emit(logger: Any, name: str, level: str = "info", **fields: Any) -> None:
    """Log catalogued event ``name`` with ``fields``; raises ``ValueError`` for an uncatalogued name or level."""
    if name not in LOG_EVENTS:
        raise ValueError(f"unknown log event {name!r}: add it to common.logging.LOG_EVENTS")
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r} for {name!r}: use one of {', '.join(LEVELS)}")
    getattr(logger, level)(name, **fields)


def log_events_markdown() -> str:
    """The page ``docs/log-events.md``: the line format, then every catalogued event in a table."""
    rows = [f"| `{name}` | {_escape_cell(meaning)} |" for name, meaning in LOG_EVENTS.items()]
    return _DOC_INTRO + "| event | meaning |\n|---|---|\n" + "\n".join(rows) + "\n"


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _environment_overrides() -> tuple[str | None, bool | None]:
    """``(level, json)`` from ``FLEXPIPE_LOG_LEVEL`` and ``FLEXPIPE_LOG_FORMAT``; None where unset."""
    level = os.environ.get("FLEXPIPE_LOG_LEVEL") or None
    log_format = (os.environ.get("FLEXPIPE_LOG_FORMAT") or "").strip().lower()
    if log_format not in ("", "json", "console"):
        raise ConfigError(f"FLEXPIPE_LOG_FORMAT={log_format!r}: use 'json' or 'console'")
    return level, {"": None, "json": True, "console": False}[log_format]


def _level_number(level: str) -> int:
    name = level.strip().lower()
    if name not in LEVELS:
        raise ConfigError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}")
    return LEVELS[name]


def _wants_json(json: bool | None, stream: TextIO) -> bool:
    if json is not None:
        return json
    return not _is_terminal(stream)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _header_processors() -> list:
    """What every line gets, from structlog or stdlib alike: level, ISO-8601 UTC time, process, pid."""
    return [structlog.stdlib.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True), _add_process]


def _add_process(_logger: Any, _method: str, event_dict: dict) -> dict:
    event_dict["process"] = _identity.name
    event_dict["pid"] = os.getpid()  # read per line: a forked child logs its own pid
    return event_dict


def _keep_colliding_fields(_logger: Any, _method: str, event_dict: dict) -> dict:
    """A field named like a header key is dropped when it repeats the header's value and
    kept as ``subject_<key>`` when it differs (e.g. a supervisor's ``pid`` of a child)."""
    own = {"process": _identity.name, "pid": os.getpid()}
    for key in ("timestamp", "level", "process", "pid"):
        if key in event_dict:
            value = event_dict.pop(key)
            if own.get(key) != value:
                event_dict[f"subject_{key}"] = value
    return event_dict


def _strip_message(_logger: Any, _method: str, event_dict: dict) -> dict:
    event_dict["event"] = str(event_dict.get("event", "")).rstrip()  # warnings end in a newline
    return event_dict


def _header_first(_logger: Any, _method: str, event_dict: dict) -> dict:
    header = {key: event_dict.pop(key) for key in HEADER_KEYS if key in event_dict}
    return header | event_dict


def _formatter(as_json: bool, stream: TextIO) -> logging.Formatter:
    if as_json:
        renderers = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        renderers = [structlog.dev.ConsoleRenderer(colors=_is_terminal(stream))]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, _strip_message, *_header_processors()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _header_first, *renderers],
    )


def _install_handler(stream: TextIO, formatter: logging.Formatter, level: int) -> None:
    """Replace the handler a previous call installed; handlers installed by others stay."""
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(stream)
    _handler.setFormatter(formatter)
    root.addHandler(_handler)
    root.setLevel(level)


_DOC_INTRO = """# Log events

<!-- Generated by `python -m common.logging --markdown > docs/log-events.md`; edit `common/logging.py`. -->

Every FlexPipe process writes one line per event to standard error. Away from a terminal
(under systemd, in a pipe or a file) each line is a JSON object; on a terminal it is
rendered for people. `FLEXPIPE_LOG_FORMAT=json|console` forces the format and
`FLEXPIPE_LOG_LEVEL=debug|info|warning|error|critical` sets the threshold (default `info`).

```json
{"timestamp": "2026-05-09T07:35:25.123456Z", "level": "info", "event": "refactor.phase_finished", "process": "controller", "pid": 4242, "actor": "coordinator", "pipeline_id": "p1", "epoch": 3, "phase": "SWITCH", "duration_s": 0.008}
```

Every line has:

- `timestamp` — ISO-8601, UTC; `level` — `debug`, `info`, `warning`, `error` or `critical`;
- `event` — a name from the table below (library records carry their message here and
  the stdlib logger name in `logger`);
- `process` — the process role (`controller`, `worker`, `engine_host`, `supervisor`, ...)
  and `pid` — the operating-system process id of the process that wrote the line.

Fields bound to a logger appear on each of its lines: `actor` (`monitor`, `coordinator`,
`allocator`), `worker_id`, `host_id`, `pipeline_id` and `epoch` (every line about a
pipeline). Each event adds its own fields; the table names the main ones, and every
refactor phase line carries `pipeline_id`, `epoch`, `phase` and `duration_s`, so a
refactor's timeline can be rebuilt from the log alone. A field that names a header key
but holds another value (a supervisor logging its child's pid) appears as
`subject_<key>`. Errors carry the traceback as text in `exception`.

"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FlexPipe's log event catalogue")
    parser.add_argument("--markdown", action="store_true", help="print docs/log-events.md")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(log_events_markdown())
    else:
        for name, meaning in LOG_EVENTS.items():
            print(f"{name:28} {meaning}")


if __name__ == "__main__":
    main()
