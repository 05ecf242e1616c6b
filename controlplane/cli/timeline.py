"""Refactor timelines rebuilt from FlexPipe's JSON log lines alone, for ``fpctl timeline``.

Pure: lines in, dataclasses out; nothing here opens a file or talks to the bus. Only the
``refactor.*`` events of ``docs/log-events.md`` count. Any field may be missing from a line
(older writers), so every field is read leniently: a value of the wrong type is unknown.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

IN_PROGRESS = "in progress"
OUTCOMES = ("committed", "aborted", "refused", IN_PROGRESS)
_OUTCOME_OF = {"refactor.committed": "committed", "refactor.aborted": "aborted", "refactor.refused": "refused"}
# refactor.queued is not here: it names no refactor_id, so no timeline can claim it.
TIMELINE_EVENTS = ("refactor.requested", "refactor.phase_started", "refactor.phase_finished", *_OUTCOME_OF)
# These lines carry the epoch serving when the refactor was asked for; all others the target epoch.
_SERVING_EPOCH_EVENTS = ("refactor.requested", "refactor.refused")


@dataclass(slots=True)
class PhaseSpan:
    """One run of one phase. Invariants: ``offset_s`` is seconds from the refactor's
    ``started_at`` (None when either time is unknown); ``duration_s`` and ``ok`` stay None
    until a ``refactor.phase_finished`` line for the phase is read."""

    phase: str
    offset_s: float | None = None
    duration_s: float | None = None
    ok: bool | None = None
    weight_bytes: int | None = None
    kv_bytes: int | None = None


@dataclass(slots=True)
class RefactorTimeline:
    """One refactor of one pipeline, as far as the log tells it.

    Invariants: ``outcome`` is one of ``OUTCOMES``, the last terminal line's; ``started_at``
    (UTC) is the earliest time its lines show (a phase whose start line is missing counts
    from its end and duration); ``phases`` are in log order; ``from_epoch`` is the serving
    epoch the first request or refusal line gave, ``to_epoch`` the target epoch the first
    other line gave, and ``to_epoch == from_epoch + 1`` whenever only one was logged;
    ``duration_s`` is None while in progress; ``weight_bytes``/``kv_bytes`` are the terminal
    line's, else the sum over its finished phases, else None; ``aborted_in`` is the phase an
    abort named.
    """

    pipeline_id: str | None
    refactor_id: int | str | None
    kind: str | None = None
    by: str | None = None
    from_epoch: int | None = None
    to_epoch: int | None = None
    target: list[str] = field(default_factory=list)
    outcome: str = IN_PROGRESS
    reason: str | None = None
    aborted_in: str | None = None
    started_at: datetime | None = None
    duration_s: float | None = None
    stall_s: float | None = None
    weight_bytes: int | None = None
    kv_bytes: int | None = None
    phases: list[PhaseSpan] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; ``started_at`` as ISO-8601 UTC ending in ``Z``, like the log."""
        as_dict = asdict(self)
        as_dict["started_at"] = self.started_at.isoformat().replace("+00:00", "Z") if self.started_at else None
        return as_dict


def read_refactor_events(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The ``refactor.*`` events among ``lines``, in order, each the object its line holds.

    Lines that are not a JSON object (console rendering, tracebacks, a partial last line)
    and events of other families are skipped without a word.
    """
    events = []
    for line in lines:
        event = _json_object(line)
        if event is not None and isinstance(event.get("event"), str) and event["event"].startswith("refactor."):
            events.append(event)
    return events


def build_timelines(events: Iterable[dict[str, Any]]) -> list[RefactorTimeline]:
    """One timeline per refactor, ordered by start time (those with no timestamp last).

    Only ``TIMELINE_EVENTS`` count. Lines are grouped by ``(pipeline_id, refactor_id)``, or
    by ``(pipeline_id, target epoch)`` when ``refactor_id`` is missing. Within a group a
    ``refactor.requested`` line opens a new timeline (with an id: unless one in progress still
    lacks its request line), so ids reused after a restart stay apart; ``refactor.refused``
    ends the latest refactor in progress (without an id: the latest not past PLAN, as another
    may be running); any other line goes to the running refactor (one past PLAN), else the
    oldest in progress, else the group's last timeline.
    """
    drafts: list[_Draft] = []
    groups: dict[tuple, list[_Draft]] = {}
    for event in events:
        if event.get("event") not in TIMELINE_EVENTS:
            continue
        key = _group(event)
        group = groups.setdefault(key, [])
        draft = _pick(group, event["event"], has_id=key[1] == "id")
        if draft is None:
            draft = _Draft(RefactorTimeline(_str(event.get("pipeline_id")), _id(event.get("refactor_id"))))
            group.append(draft)
            drafts.append(draft)
        draft.apply(event)
    timelines = [draft.finish() for draft in drafts]
    return sorted(timelines, key=lambda t: (t.started_at is None, t.started_at or _EARLIEST))


_EARLIEST = datetime.min.replace(tzinfo=timezone.utc)


@dataclass(slots=True)
class _OpenSpan:
    span: PhaseSpan
    started: datetime | None
    finished: bool = False


@dataclass(slots=True)
class _Draft:
    """A timeline being read, with the absolute times its offsets are computed from at the end."""

    timeline: RefactorTimeline
    spans: list[_OpenSpan] = field(default_factory=list)
    times: list[datetime] = field(default_factory=list)
    ended_at: datetime | None = None
    requested: bool = False

    @property
    def in_progress(self) -> bool:
        return self.timeline.outcome == IN_PROGRESS

    @property
    def past_plan(self) -> bool:
        return any(open_span.span.phase != "PLAN" for open_span in self.spans)

    def apply(self, event: dict[str, Any]) -> None:
        t, name, epoch = self.timeline, event["event"], _int(event.get("epoch"))
        when = _timestamp(event.get("timestamp"))
        if when is not None:
            self.times.append(when)
        if name == "refactor.requested":
            self.requested = True
            t.kind, t.by = _str(event.get("kind")) or t.kind, _str(event.get("by")) or t.by
            t.target = _targets(event.get("target")) or t.target
        if name in _SERVING_EPOCH_EVENTS:
            t.from_epoch = _first(t.from_epoch, epoch)
        else:
            t.to_epoch = _first(t.to_epoch, epoch)
        if name == "refactor.phase_started":
            self.spans.append(_OpenSpan(PhaseSpan(_str(event.get("phase")) or "?"), when))
        elif name == "refactor.phase_finished":
            self._finish_phase(event, when)
        elif name in _OUTCOME_OF:
            self._end(name, event, when)

    def _finish_phase(self, event: dict[str, Any], when: datetime | None) -> None:
        phase, duration = _str(event.get("phase")) or "?", _float(event.get("duration_s"))
        open_span = next((s for s in reversed(self.spans) if s.span.phase == phase and not s.finished), None)
        if open_span is None:  # its phase_started line is not in the log
            started = _before(when, duration) if when is not None and duration is not None else None
            open_span = _OpenSpan(PhaseSpan(phase), started)
            self.spans.append(open_span)
        if duration is None and when is not None and open_span.started is not None:
            duration = (when - open_span.started).total_seconds()
        span = open_span.span
        span.duration_s, span.ok = duration, _bool(event.get("ok"))
        span.weight_bytes, span.kv_bytes = _int(event.get("weight_bytes")), _int(event.get("kv_bytes"))
        open_span.finished = True

    def _end(self, name: str, event: dict[str, Any], when: datetime | None) -> None:
        t = self.timeline
        t.outcome, self.ended_at = _OUTCOME_OF[name], when
        t.reason = _str(event.get("reason")) or t.reason
        if name == "refactor.aborted":
            t.aborted_in = _str(event.get("phase"))
        t.duration_s = _float(event.get("duration_s"))
        t.stall_s = _first(_float(event.get("stall_s")), t.stall_s)
        t.weight_bytes = _first(_int(event.get("weight_bytes")), t.weight_bytes)
        t.kv_bytes = _first(_int(event.get("kv_bytes")), t.kv_bytes)

    def finish(self) -> RefactorTimeline:
        t = self.timeline
        t.started_at = min([*self.times, *(s.started for s in self.spans if s.started is not None)], default=None)
        for open_span in self.spans:
            if open_span.started is not None and t.started_at is not None:
                open_span.span.offset_s = (open_span.started - t.started_at).total_seconds()
        t.phases = [open_span.span for open_span in self.spans]
        if t.from_epoch is None and t.to_epoch is not None:
            t.from_epoch = t.to_epoch - 1
        if t.to_epoch is None and t.from_epoch is not None:
            t.to_epoch = t.from_epoch + 1
        if t.duration_s is None and t.outcome != IN_PROGRESS and None not in (self.ended_at, t.started_at):
            t.duration_s = (self.ended_at - t.started_at).total_seconds()
        t.weight_bytes = _first(t.weight_bytes, _sum(s.weight_bytes for s in t.phases))
        t.kv_bytes = _first(t.kv_bytes, _sum(s.kv_bytes for s in t.phases))
        return t


def _pick(group: list[_Draft], name: str, has_id: bool) -> _Draft | None:
    """The timeline in ``group`` that a ``name`` line belongs to; None: it starts a new one."""
    running = [draft for draft in group if draft.in_progress]
    if name == "refactor.requested":
        return next((draft for draft in running if not draft.requested), None) if has_id else None
    if name == "refactor.refused":
        return next((draft for draft in reversed(running) if has_id or not draft.past_plan), None)
    return _first(*(draft for draft in running if draft.past_plan), *running, *group[-1:])


def _group(event: dict[str, Any]) -> tuple:
    pipeline_id, refactor_id = _str(event.get("pipeline_id")), _id(event.get("refactor_id"))
    if refactor_id is not None:
        return pipeline_id, "id", refactor_id
    epoch = _int(event.get("epoch"))
    if epoch is not None and event["event"] in _SERVING_EPOCH_EVENTS:
        epoch += 1
    return pipeline_id, "epoch", epoch


def _json_object(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def _before(when: datetime, seconds: float) -> datetime | None:
    try:
        return when - timedelta(seconds=seconds)
    except OverflowError:
        return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _id(value: Any) -> int | str | None:
    return _int(value) if _int(value) is not None else _str(value)


def _targets(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _sum(values: Iterable[int | None]) -> int | None:
    known = [value for value in values if value is not None]
    return sum(known) if known else None
