"""Request traces for replay: the Azure LLM inference trace format, CV rescaling, Gamma arrivals.

Azure CSV (Splitwise, ISCA'24; ``../shared/traces/azure_llm_2023``): ``TIMESTAMP,ContextTokens,GeneratedTokens``
with wall-clock timestamps. ``with_cv`` rescales the inter-arrival gaps to a target coefficient of variation
while keeping their mean (so the mean rate) and their order: each gap g becomes mean + (g - mean) * s, with s
chosen so std/mean hits the target; where that would make a gap negative, the gaps are instead redrawn by
rank from a Gamma distribution of the target CV (shape 1/CV^2), which keeps the order of long and short gaps.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from common.errors import FlexPipeError

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


class TraceError(FlexPipeError):
    """A trace file cannot be read or has no requests."""


@dataclass(frozen=True, slots=True)
class TracedRequest:
    """One request: arrival ``at`` seconds after the trace starts, its prompt and output token counts."""

    at: float
    prompt_tokens: int
    output_tokens: int


def read_azure_trace(path: str | Path, limit: int | None = None) -> list[TracedRequest]:
    """The requests of an Azure LLM trace CSV, times relative to the first; raises TraceError naming the line."""
    requests, start = [], None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in AZURE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise TraceError(f"{path}:1: the header lacks {missing}; an Azure LLM trace has {list(AZURE_COLUMNS)}")
            for line, row in enumerate(reader, start=2):
                try:
                    stamp = datetime.fromisoformat(row["TIMESTAMP"].strip()[:26]).timestamp()
                    prompt, output = int(row["ContextTokens"]), int(row["GeneratedTokens"])
                except (ValueError, TypeError, AttributeError) as exc:
                    raise TraceError(f"{path}:{line}: not an Azure trace row: {exc}") from None
                start = stamp if start is None else start
                requests.append(TracedRequest(stamp - start, prompt, output))
                if limit is not None and len(requests) >= limit:
                    break
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TraceError(f"{path} is not a CSV text file: {exc}") from None
    if not requests:
        raise TraceError(f"trace {path} has no requests")
    requests.sort(key=lambda r: r.at)
    return requests


def _cv(gaps: list[float]) -> float:
    mean = sum(gaps) / len(gaps)
    return math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean if mean > 0 else 0.0


def with_cv(requests: list[TracedRequest], target_cv: float, seed: int = 0) -> list[TracedRequest]:
    """The same requests with inter-arrival gaps of coefficient of variation ``target_cv`` and the same mean
    (module docstring). Raises TraceError for a negative target or fewer than three requests."""
    if target_cv < 0 or len(requests) < 3:
        raise TraceError("rescaling needs a CV >= 0 and at least three requests")
    gaps = [b.at - a.at for a, b in zip(requests, requests[1:])]
    mean, cv = sum(gaps) / len(gaps), _cv(gaps)
    scale = target_cv / cv if cv > 0 else 0.0
    new_gaps = [mean + (g - mean) * scale for g in gaps]
    if min(new_gaps) < 0 or cv == 0:
        drawn = sorted(gamma_gaps(len(gaps), mean, target_cv, random.Random(seed)))
        rank = sorted(range(len(gaps)), key=lambda i: gaps[i])
        new_gaps = [0.0] * len(gaps)
        for position, i in enumerate(rank):
            new_gaps[i] = drawn[position]
    times = [requests[0].at]
    for gap in new_gaps:
        times.append(times[-1] + gap)
    return [TracedRequest(t, r.prompt_tokens, r.output_tokens) for t, r in zip(times, requests)]


def gamma_gaps(count: int, mean: float, cv: float, rng: random.Random) -> list[float]:
    """``count`` inter-arrival gaps from a Gamma distribution with ``mean`` seconds and coefficient of variation
    ``cv`` (shape 1/cv^2, scale mean*cv^2; cv 0 gives constant gaps, cv 1 a Poisson process)."""
    if cv == 0:
        return [mean] * count
    shape = 1 / cv**2
    return [rng.gammavariate(shape, mean / shape) for _ in range(count)]


def gamma_arrivals(
    duration_s: float, rate: float, cv: float, seed: int = 0, prompt_tokens: int = 256, output_tokens: int = 128
) -> list[TracedRequest]:
    """Arrivals of a Gamma renewal process at ``rate`` requests/s and inter-arrival CV ``cv`` for ``duration_s``."""
    rng, at, requests = random.Random(seed), 0.0, []
    while True:
        at += gamma_gaps(1, 1 / rate, cv, rng)[0]
        if at >= duration_s:
            return requests
        requests.append(TracedRequest(at, prompt_tokens, output_tokens))
