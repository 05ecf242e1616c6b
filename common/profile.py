"""A model's measured profile: throughput T_K and latency L_K per pipeline granularity (FlexPipe Eq. 4's inputs).

``fpctl profile MODEL`` measures it on the local machine and stores it with the model
(``profile_path``); the policy reads it and estimates the granularities it lacks from the
partitioner's cost model, calibrated by what was measured. The file is JSON (msgspec), never pickle.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgspec

from common.errors import FlexPipeError

PROFILE_FILE = "flexpipe-profile.json"
PROFILE_VERSION = 1


class ProfileError(FlexPipeError):
    """A profile file cannot be read, or belongs to another model."""


class GranularityProfile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One candidate granularity as measured: ``num_stages`` stages serving ``batch_size`` concurrent requests.

    ``throughput_tokens_per_s``: output tokens per second of the whole pipeline at that batch;
    ``latency_s``: median time per output token of one request (TPOT, decode) at that batch;
    ``ttft_s``: median time to first token; ``step_s``: median seconds per micro-batch through all stages."""

    num_stages: int
    batch_size: int
    throughput_tokens_per_s: float
    latency_s: float
    ttft_s: float = 0.0
    step_s: float = 0.0


class ModelProfile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Profiles of one model (``config_sha256``: the hash of its ``config.json``) on one kind of device.

    ``device``: what ran it (e.g. "cpu: 2 cores", "NVIDIA H200"); ``prompt_tokens``/``output_tokens``:
    the request shape measured; ``candidates`` sorted by ``num_stages``."""

    version: int = PROFILE_VERSION
    model: str
    config_sha256: str
    device: str
    measured_at: str
    prompt_tokens: int
    output_tokens: int
    candidates: list[GranularityProfile]


def config_sha256(model_dir: str | Path) -> str:
    """The SHA-256 of the model's ``config.json``: a profile is valid only for the config it measured."""
    try:
        return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()
    except OSError as exc:
        raise ProfileError(f"cannot read {model_dir}/config.json: {exc.strerror or exc}") from None


def profile_path(model_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the profile of ``model_dir`` lives: beside the checkpoint when that directory is writable, else
    ``<cache>/profiles/<name>-<config hash>.json`` (cache: ``$FLEXPIPE_CACHE_DIR`` or ``~/.cache/flexpipe``)."""
    model_dir = Path(model_dir)
    if os.access(model_dir, os.W_OK):
        return model_dir / PROFILE_FILE
    cache = Path(cache_dir or os.environ.get("FLEXPIPE_CACHE_DIR") or Path.home() / ".cache" / "flexpipe")
    return cache.expanduser() / "profiles" / f"{model_dir.name}-{config_sha256(model_dir)[:12]}.json"


def save_profile(profile: ModelProfile, model_dir: str | Path) -> Path:
    """Write ``profile`` atomically (temporary file + rename) to ``profile_path(model_dir)``; returns the path."""
    path = profile_path(model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(msgspec.json.format(msgspec.json.encode(profile)))
    os.replace(temporary, path)
    return path


def load_profile(model_dir: str | Path) -> ModelProfile | None:
    """The stored profile of ``model_dir``, or None when there is none or it measured another config.
    Raises ProfileError when the file exists but is not a valid profile."""
    path = profile_path(model_dir)
    if not path.exists():
        return None
    try:
        profile = msgspec.json.decode(path.read_bytes(), type=ModelProfile)
    except (OSError, msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProfileError(f"{path} is not a FlexPipe profile: {exc}") from None
    if profile.config_sha256 != config_sha256(model_dir):
        return None
    return profile
