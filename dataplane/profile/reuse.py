"""Whether a stored profile already answers a request to measure, so that it need not run again."""

from __future__ import annotations

from pathlib import Path

from common.profile import ModelProfile, load_profile
from dataplane.profile.workload import Workload


def covers(profile: ModelProfile, stages: list[int], workload: Workload, device: str) -> bool:
    """True when ``profile`` measured every count of ``stages`` with ``workload``'s shape on ``device``."""
    measured = {c.num_stages for c in profile.candidates if c.batch_size == workload.batch_size}
    return (
        profile.device == device
        and profile.prompt_tokens == workload.prompt_tokens
        and profile.output_tokens == workload.output_tokens
        and set(stages) <= measured
    )


def reusable_profile(model_dir: str | Path, stages: list[int], workload: Workload, device: str) -> ModelProfile | None:
    """The stored profile of ``model_dir`` when it is valid for its current config.json and ``covers`` the request,
    else None. Raises ``ProfileError`` when a stored file is not a profile."""
    profile = load_profile(model_dir)
    return profile if profile is not None and covers(profile, stages, workload, device) else None
