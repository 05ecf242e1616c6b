"""Request-pattern signals of one model over a sliding window: arrival rate, CV of inter-arrival times, trend.

Pure: times are given, never read. The CV is that of the gaps between consecutive arrivals inside the
window (FlexPipe §2's signal; the paper's evaluation windows are 15 s, its trace analysis 180 s). The
trend is the least-squares slope of the arrival rate over ``TREND_BINS`` equal bins of the window.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

TREND_BINS = 6
MIN_SPAN_S = 5.0  # a window younger than this counts as this long: one request just seen is not a high rate


@dataclass(frozen=True, slots=True)
class ArrivalStats:
    """``rate`` in requests/s, ``cv`` dimensionless (0 with fewer than 3 arrivals), ``trend`` in requests/s²."""

    arrivals: int
    rate: float
    cv: float
    trend: float


def interarrival_cv(times: list[float]) -> float:
    """Coefficient of variation (std / mean, population) of the gaps between sorted ``times``; 0 when fewer than
    two gaps or a zero mean."""
    gaps = [b - a for a, b in zip(times, times[1:])]
    if len(gaps) < 2:
        return 0.0
    mean = sum(gaps) / len(gaps)
    if mean <= 0:
        return 0.0
    variance = sum((g - mean) ** 2 for g in gaps) / len(gaps)
    return math.sqrt(variance) / mean


def rate_trend(times: list[float], start: float, end: float, bins: int = TREND_BINS) -> float:
    """Least-squares slope (requests/s per second) of the per-bin arrival rate over [start, end)."""
    width = (end - start) / bins
    if width <= 0:
        return 0.0
    counts = [0] * bins
    for t in times:
        index = min(bins - 1, max(0, int((t - start) / width)))
        counts[index] += 1
    rates = [c / width for c in counts]
    centres = [start + (i + 0.5) * width for i in range(bins)]
    mean_t, mean_r = sum(centres) / bins, sum(rates) / bins
    spread = sum((t - mean_t) ** 2 for t in centres)
    return sum((t - mean_t) * (r - mean_r) for t, r in zip(centres, rates)) / spread


class ArrivalWindow:
    """Arrival times (s, one clock) and their request sizes over the last ``window_s`` seconds.

    Invariant: after ``stats(now)`` or ``add``, no kept arrival is older than ``now - window_s``
    (arrivals may be added slightly out of order; they are kept sorted)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.times: deque[float] = deque()
        self.prompt_tokens: deque[int] = deque()

    def add(self, at: float, prompt_tokens: int) -> None:
        if self.times and at < self.times[-1]:
            index = next(i for i, t in enumerate(self.times) if t > at)
            self.times.insert(index, at)
            self.prompt_tokens.insert(index, prompt_tokens)
        else:
            self.times.append(at)
            self.prompt_tokens.append(prompt_tokens)

    def expire(self, now: float) -> None:
        while self.times and self.times[0] < now - self.window_s:
            self.times.popleft()
            self.prompt_tokens.popleft()

    def stats(self, now: float, started: float | None = None) -> ArrivalStats:
        """Signals over the window ending at ``now``; ``started`` (when the model was first seen) shortens a
        window that has not filled yet, so the rate of a new model is not diluted."""
        self.expire(now)
        begin = now - self.window_s if started is None else max(now - self.window_s, started)
        span = max(now - begin, MIN_SPAN_S)
        times = list(self.times)
        return ArrivalStats(len(times), len(times) / span, interarrival_cv(times), rate_trend(times, begin, now))
