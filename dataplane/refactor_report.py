"""What one refactor did and measured, as ``LLM.refactor`` returns it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    workers: list[int] = field(default_factory=list)
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

    def to_dict(self) -> dict:
        return asdict(self)
