"""How fpctl shows the policy: its view of each model and its decisions, each with what it saw."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from common import events as ev


def policy_table(view: ev.PolicyView, wide: bool = False) -> Table:
    """One row per model: its replicas' stage counts, replicas now, the target (stages x replicas), rate and CV;
    ``wide`` adds the trend, the cooldown left and the change in flight. Cells never wrap."""
    state = "paused" if view.paused else view.mode
    table = Table(title=f"policy ({state}, {view.decisions} decisions)")
    columns = ("model", "stages", "replicas", "target", "rate/s", "CV")
    for column in columns + (("trend", "cooldown", "in flight") if wide else ()):
        table.add_column(column, no_wrap=True)
    for m in view.models:
        row = [
            Path(m.model_dir).name,
            ",".join(map(str, m.stages)) or "-",
            str(m.replicas),
            f"{m.target_stages}x{m.target_replicas}",
            f"{m.arrival_rate:.2f}",
            f"{m.cv:.2f}",
        ]
        if wide:
            row += [f"{m.trend:+.3f}", f"{m.cooldown_left_s:.0f}s", m.in_flight or "-"]
        table.add_row(*row)
    return table


def decision_line(d: ev.PolicyDecision, now: float | None = None) -> str:
    """One decision: when (seconds before ``now``, else seconds into the replay), what, how it ended, why, and
    the inputs it was taken on. Scores: ``*`` marks a measured candidate, ``!`` one the cluster cannot place;
    queues: per replica, waiting requests | each stage's input queue."""
    scores = " ".join(
        f"K{c.num_stages}{'*' if c.measured else ''}{'' if c.placeable else '!'}={c.score:.3f}" for c in d.candidates
    )
    queues = " ".join(f"{p}:{q[0]}|{','.join(map(str, q[1:]))}" for p, q in d.queues.items() if q)
    when = f"{now - d.at:.0f}s ago" if now is not None else f"t={d.at:.1f}s"
    line = (
        f"#{d.seq} {when} {d.kind}: {d.action} -> {d.outcome}"
        + (f" ({d.reason})" if d.reason else "")
        + (f" in {d.duration_s:.1f}s" if d.outcome not in ("issued", "held") else "")
        + (f"\n    why: {d.why}" if d.why else "")
        + f"\n    saw: rate {d.arrival_rate:.2f}/s CV {d.cv:.2f} trend {d.trend:+.3f}/s2,"
        + f" waiting|stage queues [{queues}], TTFT p99 {d.ttft_p99_s:.2f}s TPOT p99 {d.tpot_p99_s:.3f}s"
        + f"\n    Eq.4 {scores}; Eq.11 {d.queue_stages} stages; Eq.5 replicas {[c.replicas for c in d.candidates]}"
    )
    if d.placement:
        line += f" | on {','.join(d.placement)}"
    return line


def print_decisions(console: Console, decisions: list[ev.PolicyDecision], now: float | None = None) -> None:
    for decision in decisions:
        console.print(decision_line(decision, now), soft_wrap=True, highlight=False, markup=False)
