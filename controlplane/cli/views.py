"""How fpctl shows things: rich tables for people, plain JSON for scripts."""

from __future__ import annotations

import itertools
import json

import msgspec
from rich.console import Console
from rich.table import Table

from common import events as ev
from controlplane.cli.policy_views import policy_table


def to_json(value) -> str:
    return json.dumps(msgspec.to_builtins(value), indent=2, sort_keys=True)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def workers_table(status: ev.StatusReply, wide: bool = False) -> Table:
    """Workers (and engine hosts): id, state, device, free memory, stages; ``wide`` adds pid, host, total
    memory, heartbeat age and each stage's queue and busy fraction. Cells never wrap: a table wider
    than the terminal is cropped at its right edge, so every row stays one line."""
    table = Table(title="workers")
    columns = ("worker", "state", "pid", "host", "device", "memory free / total", "heartbeat", "stages")
    narrow = ("worker", "state", "device", "mem free", "stages")
    for column in columns if wide else narrow:
        table.add_column(column, no_wrap=True)
    for w in status.workers:
        state = w.state if w.state == "alive" else f"[red]{w.state}[/red]"
        device = f"{w.device.kind}:{w.device.name}"
        if wide:
            stages = ", ".join(
                f"{s.pipeline_id}#{s.stage} q={s.queue_length} busy={s.busy_fraction:.0%}" for s in w.stages
            )
            memory = f"{_bytes(w.device.memory_free)} / {_bytes(w.device.memory_total)}"
            table.add_row(
                w.worker_id, state, str(w.pid), w.host, device, memory, f"{w.last_heartbeat_age_s:.1f}s", stages or "-"
            )
        else:
            stages = ",".join(f"{s.pipeline_id}#{s.stage}" for s in w.stages)
            table.add_row(w.worker_id, state, device, _bytes(w.device.memory_free), stages or "-")
    for h in status.engine_hosts:
        if wide:
            table.add_row(
                h.host_id, h.state, str(h.pid), "", "engine host", "", "", h.http_address or h.request_address
            )
        else:
            table.add_row(h.host_id, h.state, "gateway" if h.http_address else "engine host", "", "-")
    return table


def pipelines_table(status: ev.StatusReply, wide: bool = False) -> Table:
    """One row per stage: pipeline, state, epoch, stage, worker, units, queue; ``wide`` adds the busy
    fraction and KV blocks used/free. Cells never wrap (see ``workers_table``)."""
    table = Table(title="pipelines")
    columns = ("pipeline", "state", "epoch", "stage", "worker", "units", "queue")
    for column in columns + (("busy", "KV used/free") if wide else ()):
        table.add_column(column, no_wrap=True)
    for p in status.pipelines:
        state = p.state if p.state == "READY" else f"[yellow]{p.state}[/yellow]"
        if p.reason and wide:
            state += f" ({p.reason})"
        for i, s in enumerate(p.stages):
            units = f"{s.units[0]}..{s.units[-1]}" if s.units else ""
            row = [
                p.pipeline_id if i == 0 else "",
                state if i == 0 else "",
                str(p.epoch) if i == 0 else "",
                str(s.stage),
                s.worker_id,
                units,
                str(s.queue_length),
            ]
            if wide:
                row += [f"{s.busy_fraction:.0%}", f"{s.kv_blocks_used}/{s.kv_blocks_free}"]
            table.add_row(*row)
        if not p.stages:
            table.add_row(p.pipeline_id, state, str(p.epoch), *[""] * (len(table.columns) - 3))
    return table


def print_status(console: Console, status: ev.StatusReply, wide: bool = False) -> None:
    """Both tables, then what does not fit a narrow table: why a pipeline is not READY, where the
    gateway serves the OpenAI API and engine hosts take requests, and how many control messages were
    rejected."""
    console.print(workers_table(status, wide))
    console.print(pipelines_table(status, wide))
    for h in status.engine_hosts:
        if h.http_address:
            console.print(f"OpenAI API: {h.http_address}/v1 (gateway {h.host_id})", soft_wrap=True)
    if not wide:
        for p in status.pipelines:
            if p.reason:
                console.print(f"{p.pipeline_id}: {p.reason}", soft_wrap=True)
        for h in status.engine_hosts:
            console.print(f"{h.host_id} takes requests at {h.request_address}", soft_wrap=True)
    if status.rejected_messages:
        console.print(f"rejected messages: {status.rejected_messages}")
    if status.policy is not None:
        console.print(policy_table(status.policy, wide))


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
