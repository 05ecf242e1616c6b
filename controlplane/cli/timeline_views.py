"""How ``fpctl timeline`` shows refactors to people: one rich table per refactor, with a bar per phase."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from controlplane.cli.timeline import IN_PROGRESS, RefactorTimeline
from controlplane.cli.views import _bytes

OUTCOME_STYLES = {"committed": "green", "aborted": "red", "refused": "yellow", "in progress": "cyan"}
BAR_WIDTH = 16


def timeline_table(timeline: RefactorTimeline) -> Table:
    """A table of ``timeline``'s phases; title and caption carry the refactor as a whole."""
    t = timeline
    style = OUTCOME_STYLES[t.outcome]
    heading = (
        f"{t.pipeline_id or '?'} refactor {_or_dash(t.refactor_id)}: {t.kind or '?'} "
        f"epoch {_or_dash(t.from_epoch)} -> {_or_dash(t.to_epoch)}, "
    )
    table = Table(
        title=f"{escape(heading)}[{style}]{escape(t.outcome)}[/{style}]",
        caption=escape(_caption(t)),
        title_justify="left",
        caption_justify="left",
    )
    for column in ("phase", "start", "duration", "ok", "weights", "KV"):
        table.add_column(column, justify="right" if column in ("start", "duration", "weights", "KV") else "left")
    table.add_column("timeline", min_width=BAR_WIDTH, no_wrap=True)
    scale = _span_s(t)
    for p in t.phases:
        ok = "-" if p.ok is None else ("yes" if p.ok else "[red]no[/red]")
        unfinished = "[cyan]running[/cyan]" if t.outcome == IN_PROGRESS else "?"
        duration = unfinished if p.duration_s is None else _seconds(p.duration_s)
        table.add_row(
            escape(p.phase),
            _seconds(p.offset_s, "+"),
            duration,
            ok,
            _size(p.weight_bytes),
            _size(p.kv_bytes),
            _bar(p.offset_s, p.duration_s, scale),
        )
    return table


def print_timelines(console: Console, timelines: list[RefactorTimeline]) -> None:
    if not timelines:
        console.print("no refactors in the log")
    for timeline in timelines:
        console.print(timeline_table(timeline))


def _caption(t: RefactorTimeline) -> str:
    parts = [f"started {t.started_at:%Y-%m-%d %H:%M:%S.%f}Z" if t.started_at else "start unknown"]
    if t.duration_s is not None:
        parts.append(f"took {_seconds(t.duration_s)}")
    if t.stall_s is not None:
        parts.append(f"stall {_seconds(t.stall_s)}")
    if t.weight_bytes is not None or t.kv_bytes is not None:
        parts.append(f"moved {_size(t.weight_bytes)} weights, {_size(t.kv_bytes)} KV")
    if t.by:
        parts.append(f"by {t.by}")
    if t.target:
        parts.append("target " + ", ".join(t.target))
    if t.reason:
        parts.append(f"{t.outcome}{' in ' + t.aborted_in if t.aborted_in else ''}: {t.reason}")
    return "; ".join(parts)


def _span_s(t: RefactorTimeline) -> float:
    """Seconds the bars cover: the refactor's duration or the end of its last timed phase."""
    ends = [p.offset_s + (p.duration_s or 0.0) for p in t.phases if p.offset_s is not None]
    return max([t.duration_s or 0.0, *ends])


def _bar(offset_s: float | None, duration_s: float | None, scale_s: float) -> str:
    if offset_s is None or scale_s <= 0:
        return ""
    start = min(BAR_WIDTH - 1, max(0, int(offset_s / scale_s * BAR_WIDTH)))
    if duration_s is None:
        return " " * start + "#" + "." * (BAR_WIDTH - start - 1)
    length = max(1, round(duration_s / scale_s * BAR_WIDTH))
    return " " * start + "#" * min(length, BAR_WIDTH - start)


def _seconds(value: float | None, sign: str = "") -> str:
    if value is None:
        return "-"
    return f"{sign}{value * 1000:.3g} ms" if abs(value) < 1 else f"{sign}{value:.3g} s"


def _size(value: int | None) -> str:
    return "-" if value is None else _bytes(value)


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)
