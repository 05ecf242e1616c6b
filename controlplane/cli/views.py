"""How fpctl shows things: rich tables for people, plain JSON for scripts."""

from __future__ import annotations

import itertools
import json

import msgspec
from rich.console import Console
from rich.table import Table

from common import events as ev


def to_json(value) -> str:
    return json.dumps(msgspec.to_builtins(value), indent=2, sort_keys=True)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def workers_table(status: ev.StatusReply) -> Table:
    table = Table(title="workers")
    for column in ("worker", "state", "pid", "host", "device", "memory free / total", "heartbeat age", "stages"):
        table.add_column(column)
    for w in status.workers:
        stages = ", ".join(f"{s.pipeline_id}#{s.stage} q={s.queue_length} busy={s.busy_fraction:.0%}" for s in w.stages)
        state = w.state if w.state == "alive" else f"[red]{w.state}[/red]"
        table.add_row(
            w.worker_id,
            state,
            str(w.pid),
            w.host,
            f"{w.device.kind}:{w.device.name}",
            f"{_bytes(w.device.memory_free)} / {_bytes(w.device.memory_total)}",
            f"{w.last_heartbeat_age_s:.1f}s",
            stages or "-",
        )
    for h in status.engine_hosts:
        table.add_row(h.host_id, h.state, str(h.pid), "", "engine host", "", "", h.request_address)
    return table


def pipelines_table(status: ev.StatusReply) -> Table:
    table = Table(title="pipelines")
    for column in ("pipeline", "state", "epoch", "stage", "worker", "units", "queue", "busy", "KV used/free"):
        table.add_column(column)
    for p in status.pipelines:
        state = p.state if p.state == "READY" else f"[yellow]{p.state}[/yellow]"
        if p.reason:
            state += f" ({p.reason})"
        for i, s in enumerate(p.stages):
            units = f"{s.units[0]}..{s.units[-1]}" if s.units else ""
            table.add_row(
                p.pipeline_id if i == 0 else "",
                state if i == 0 else "",
                str(p.epoch) if i == 0 else "",
                str(s.stage),
                s.worker_id,
                units,
                str(s.queue_length),
                f"{s.busy_fraction:.0%}",
                f"{s.kv_blocks_used}/{s.kv_blocks_free}",
            )
        if not p.stages:
            table.add_row(p.pipeline_id, state, str(p.epoch), "", "", "", "", "", "")
    return table


def print_status(console: Console, status: ev.StatusReply) -> None:
    console.print(workers_table(status))
    console.print(pipelines_table(status))
    if status.rejected_messages:
        console.print(f"rejected messages: {status.rejected_messages}")


def print_refactor_outcome(console: Console, outcome) -> None:
    """A refactor's outcome, or a dry run's plan, for people."""
    head = f"pipeline {outcome.pipeline_id}: {outcome.outcome}"
    if outcome.kind:
        head += f" {outcome.kind}"
    console.print(f"[bold]{head}[/bold] (epoch {outcome.epoch}){' - ' + outcome.reason if outcome.reason else ''}")
    if outcome.target:
        console.print(
            "target: "
            + ", ".join(
                f"{r} on {w}" if w else r for r, w in itertools.zip_longest(outcome.target, outcome.workers or [])
            )
        )
    for move in outcome.moves:
        console.print(f"  {move}")
    if outcome.outcome == "planned":
        sources = ", ".join(f"{k} {_bytes(v)}" for k, v in outcome.weight_bytes_by_source.items()) or "none"
        console.print(
            f"weights to move: {sources}; KV now: {_bytes(outcome.kv_bytes)}; "
            f"estimated stall {outcome.stall_estimate_s * 1e3:.1f} ms"
        )
    elif outcome.phase_seconds:
        phases = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in outcome.phase_seconds.items())
        console.print(
            f"phases: {phases}; weights {_bytes(outcome.weight_bytes)}, KV {_bytes(outcome.kv_bytes)}, "
            f"stall {outcome.stall_s * 1e3:.1f} ms"
        )
