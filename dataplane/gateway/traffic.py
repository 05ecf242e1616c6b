"""What the gateway tells the monitor about its traffic: arrivals and finished requests, batched per heartbeat."""

from __future__ import annotations

import threading
import time
from typing import Callable

from common import events as ev

MAX_BATCH = 10_000  # entries kept between two reports; beyond this the oldest are dropped (a stalled bus)


class TrafficRecorder:
    """Collects arrivals (HTTP thread) and hands them out as one ``TrafficReport`` (engine host thread).

    Thread-safe. Invariant: every recorded arrival and completion appears in exactly one report, unless more
    than ``MAX_BATCH`` pile up between two reports; ages are measured when the report is made, so the
    controller places arrivals on its own clock."""

    def __init__(self, host_id: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.host_id, self.clock = host_id, clock
        self._lock = threading.Lock()
        self._arrivals: list[tuple[float, str, int]] = []
        self._completions: list[ev.Completion] = []

    def arrived(self, model_dir: str, prompt_tokens: int) -> None:
        with self._lock:
            self._arrivals.append((self.clock(), model_dir, prompt_tokens))
            del self._arrivals[:-MAX_BATCH]

    def finished(self, model_dir: str, output_tokens: int, ttft_s: float, tpot_s: float) -> None:
        with self._lock:
            self._completions.append(
                ev.Completion(model_dir=model_dir, output_tokens=output_tokens, ttft_s=ttft_s, tpot_s=tpot_s)
            )
            del self._completions[:-MAX_BATCH]

    def reports(self) -> list[ev.Event]:
        """The report of everything since the last one, or nothing when there was no traffic."""
        with self._lock:
            arrivals, self._arrivals = self._arrivals, []
            completions, self._completions = self._completions, []
        if not arrivals and not completions:
            return []
        now = self.clock()
        return [
            ev.TrafficReport(
                sender=f"{self.host_id}.traffic",
                host_id=self.host_id,
                arrivals=[ev.Arrival(age_s=now - at, model_dir=m, prompt_tokens=p) for at, m, p in arrivals],
                completions=completions,
            )
        ]
