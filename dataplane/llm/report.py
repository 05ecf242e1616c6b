"""What one refactor did and measured, as ``LLM.refactor`` returns it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from common import events as ev


@dataclass
class RefactorReport:
    """A refactor's account. ``outcome`` is ``committed`` or ``aborted``; ``epoch`` serves afterwards.

    ``stall_s`` is how long the engine launched nothing at SWITCH (from the drained
    pipeline to the first new-epoch micro-batch); ``switch_s`` adds the drain of the
    micro-batches in flight. ``weight_bytes_by_source`` and ``unit_sources`` say where each
    gained unit came from (``cache``, ``peer``, ``disk``); ``kv_bytes`` = pre-copy + delta;
    ``requests_carried`` counts the requests holding KV when the layout switched;
    ``switch_window`` is SWITCH's start and end on ``time.perf_counter``'s clock, the clock
    of request token times.
    """

    refactor_id: int
    kind: str
    from_epoch: int
    old_layout: list[str]
    new_layout: list[str]
    outcome: str = "running"
    reason: str = ""
    epoch: int = -1
    workers: list[str] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    weight_bytes: int = 0
    weight_bytes_by_source: dict[str, int] = field(default_factory=dict)
    unit_sources: dict[str, str] = field(default_factory=dict)
    kv_layers_moved: list[int] = field(default_factory=list)
    kv_bytes: int = 0
    kv_bytes_precopy: int = 0
    kv_bytes_delta: int = 0
    precopy_rounds: int = 0
    stall_s: float = 0.0
    switch_s: float = 0.0
    requests_carried: int = 0
    switch_window: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def from_outcome(cls, outcome: ev.RefactorOutcome, clock_offset_s: float = 0.0) -> RefactorReport:
        """The report of a refactor the coordinator answered with ``outcome``; ``clock_offset_s`` turns the
        engine's monotonic clock into ``time.perf_counter``'s (both are this process's when the LLM hosts it)."""
        switch = outcome.switch or ev.SwitchTiming()
        window = (
            (switch.paused_at + clock_offset_s, switch.resumed_at + clock_offset_s) if outcome.switch else (0.0, 0.0)
        )
        return cls(
            refactor_id=outcome.refactor_id,
            kind=outcome.kind,
            from_epoch=outcome.from_epoch,
            old_layout=list(outcome.old_layout),
            new_layout=list(outcome.target),
            outcome=outcome.outcome,
            reason=outcome.reason,
            epoch=outcome.epoch,
            workers=list(outcome.workers),
            phase_seconds=dict(outcome.phase_seconds),
            weight_bytes=outcome.weight_bytes,
            weight_bytes_by_source=dict(outcome.weight_bytes_by_source),
            unit_sources=dict(outcome.unit_sources),
            kv_layers_moved=list(outcome.kv_layers_moved),
            kv_bytes=outcome.kv_bytes,
            kv_bytes_precopy=outcome.kv_bytes_precopy,
            kv_bytes_delta=outcome.kv_bytes_delta,
            precopy_rounds=outcome.precopy_rounds,
            stall_s=outcome.stall_s,
            switch_s=outcome.switch_s,
            requests_carried=outcome.requests_carried,
            switch_window=window,
        )

    def to_dict(self) -> dict:
        return asdict(self)
