"""Measuring one granularity (a K-stage pipeline) and a whole profile, without any CLI."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

from common.model.spec import ModelSpec
from common.profile import GranularityProfile, ModelProfile, config_sha256
from dataplane.llm.llm import LLM
from dataplane.profile import timings
from dataplane.profile.device import device_description
from dataplane.profile.workload import (
    WARM_UP_OUTPUT_TOKENS,
    WARM_UP_SEED,
    Workload,
    check_stage_counts,
    default_stage_counts,
)
from dataplane.transport import check_transport

# called with (K, None) when the K-stage measurement starts and (K, its result) when it is done
Progress = Callable[[int, GranularityProfile | None], None]


def measure_granularity(
    model_dir: str | Path, num_stages: int, workload: Workload, transport: str = "shm"
) -> GranularityProfile:
    """Serve ``model_dir`` with ``num_stages`` stages, send one warm-up request, then ``workload.batch_size``
    concurrent requests in one ``generate``, and return what they measured:

    * ``throughput_tokens_per_s``: output tokens of the batch / seconds from its first arrival to its last finish;
    * ``latency_s``: median over the requests of seconds per output token after the first (TPOT);
    * ``ttft_s``: median seconds to the first token;
    * ``step_s``: seconds per micro-batch through all stages, as the engine's moving average (the newest step
      weighs 0.2) over the measured batch's steps only, read at its end: mostly decode steps when the
      requests produce a dozen tokens or more (the engine keeps no per-step record to take a median of).

    Every worker process started here is stopped before it returns or raises."""
    spec = ModelSpec.from_dir(model_dir)
    warm_up = workload.prompts(spec, 1, seed=WARM_UP_SEED)
    prompts = workload.prompts(spec, workload.batch_size)
    with LLM(model_dir, num_stages=num_stages, transport=transport) as llm:
        llm.generate(warm_up, workload.sampling_params(min(workload.output_tokens, WARM_UP_OUTPUT_TOKENS)))
        llm.engine.call(restart_step_average(llm.engine))
        outputs = llm.generate(prompts, workload.sampling_params())
        step_s = llm.engine.step_seconds
    produced = sum(len(o.token_ids) for o in outputs)
    return GranularityProfile(
        num_stages=num_stages,
        batch_size=workload.batch_size,
        throughput_tokens_per_s=produced / timings.batch_seconds(outputs),
        latency_s=timings.median_tpot_s(outputs),
        ttft_s=timings.median_ttft_s(outputs),
        step_s=step_s,
    )


def measure_profile(
    model_dir: str | Path,
    stages: Iterable[int] | None = None,
    batch: int = 8,
    prompt_tokens: int = 64,
    output_tokens: int = 32,
    progress: Progress | None = None,
    transport: str = "shm",
) -> ModelProfile:
    """The profile of ``model_dir`` at each stage count of ``stages`` (default: ``default_stage_counts``), measured
    one after the other with ``measure_granularity``; ``progress`` hears of each start and result. Saves nothing.
    Raises ``FlexPipeError`` subclasses for a bad model directory, stage count or workload, or a failed pipeline."""
    model_dir = Path(model_dir).resolve()
    spec = ModelSpec.from_dir(model_dir)
    workload = Workload(batch, prompt_tokens, output_tokens)
    workload.check(spec)
    check_transport(transport)
    counts = check_stage_counts(stages if stages is not None else default_stage_counts(spec), spec)
    candidates = []
    for k in counts:
        if progress is not None:
            progress(k, None)
        candidates.append(measure_granularity(model_dir, k, workload, transport))
        if progress is not None:
            progress(k, candidates[-1])
    return ModelProfile(
        model=model_dir.name,
        config_sha256=config_sha256(model_dir),
        device=device_description(transport),
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        candidates=candidates,
    )


def restart_step_average(engine) -> Callable[[], None]:
    """A call for the engine's loop thread that forgets its moving average of micro-batch seconds, so that the
    next steps alone make it (the warm-up's slow first steps would otherwise linger in it)."""

    def restart() -> None:
        engine.step_seconds = 0.0

    return restart
