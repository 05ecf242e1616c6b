"""Per-request timings of a measured batch, from ``RequestOutput.metrics`` (``time.perf_counter`` seconds)."""

from __future__ import annotations

import statistics

from dataplane.engine.sampling_params import RequestOutput


def time_per_output_token_s(output: RequestOutput) -> float:
    """Seconds per output token after the first (TPOT): (last token time - first token time) / (tokens - 1)."""
    times = output.metrics["token_times"]
    if len(times) < 2:
        raise ValueError(f"request {output.request_id} produced {len(times)} token(s); TPOT needs at least 2")
    return (times[-1] - times[0]) / (len(times) - 1)


def time_to_first_token_s(output: RequestOutput) -> float:
    """Seconds from the request's arrival at the engine to its first token (TTFT)."""
    return output.metrics["first_token_time"] - output.metrics["arrival_time"]


def batch_seconds(outputs: list[RequestOutput]) -> float:
    """Seconds from the first request's arrival to the last request's finish."""
    return max(o.metrics["finish_time"] for o in outputs) - min(o.metrics["arrival_time"] for o in outputs)


def median_tpot_s(outputs: list[RequestOutput]) -> float:
    return statistics.median(time_per_output_token_s(o) for o in outputs)


def median_ttft_s(outputs: list[RequestOutput]) -> float:
    return statistics.median(time_to_first_token_s(o) for o in outputs)
