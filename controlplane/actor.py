"""What a control-plane actor is: a pure state machine from events to actions.

An actor never touches a socket, a clock or a logger. Its shell (``controlplane.shell``)
feeds it decoded events with the current time and carries out the actions it returns.
Tests do the same with plain lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from common.events import Event


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passing; the shell delivers one every ``tick_interval_s``. Never on the wire."""

    now: float


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``event`` to the peer named ``peer`` (a worker, engine host or client)."""

    peer: str
    event: Event


@dataclass(frozen=True, slots=True)
class Tell:
    """Deliver ``event`` to the actor named ``actor``, wherever it runs."""

    actor: str
    event: Event


@dataclass(frozen=True, slots=True)
class Log:
    """A structured log line; ``name`` is from ``common.logging.LOG_EVENTS``."""

    name: str
    fields: dict = field(default_factory=dict)
    level: str = "info"


Action = Send | Tell | Log


class Actor(Protocol):
    """``handle`` is deterministic given the actor's state, the event and ``now``."""

    name: ClassVar[str]
    accepts: ClassVar[tuple[type, ...]]

    def handle(self, event: Event | Tick, now: float) -> list[Action]: ...
