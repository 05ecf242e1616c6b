"""FlexPipe's configuration: one TOML file, environment overrides, defaults that work on one machine.

Lookup: the path given explicitly, else ``$FLEXPIPE_CONFIG``, else
``~/.config/flexpipe/flexpipe.toml`` when it exists, else defaults only. Any field can be
overridden by ``FLEXPIPE_<SECTION>_<FIELD>`` (upper case), e.g. ``FLEXPIPE_CONTROLLER_TCP=tcp://0.0.0.0:7700``.

    [controller]
    ipc = ""                      # default: ipc://<runtime dir>/controller.sock
    tcp = ""                      # e.g. "tcp://0.0.0.0:7700"; CURVE unless [security] insecure
    heartbeat_interval_s = 1.0
    lost_after_heartbeats = 3
    allocator = ""                # endpoint of an allocator running alone; "" = hosted in the controller

    [security]
    key_dir = ""                  # default: $FLEXPIPE_KEY_DIR or ~/.config/flexpipe/keys
    insecure = false              # plain TCP, loopback only

    [cluster]                     # what `fpctl up` starts
    workers = 2
    worker_memory = "4GiB"        # the virtual device of each CPU worker
    restart_limit = 3
    ready_timeout_s = 60.0

    [gateway]                     # the OpenAI-compatible HTTP front end (with the engines it hosts)
    host = "127.0.0.1"            # loopback unless you mean to expose it
    port = 8000                   # 0 = any free port (shown by `fpctl status`)
    max_waiting_requests = 256    # per pipeline, admitted beyond those running; more get 429

    [policy]                      # the autoscaler: granularity and replicas follow the traffic
    mode = "flexpipe"             # or "static": keep what was deployed
    interval_s = 5.0              # how often it decides
    window_s = 30.0               # arrivals the rate and CV are measured over
    cooldown_s = 30.0             # between two changes of one model's granularity
    ...                           # every field of PolicyConfig; per model: [[policy.model]] name = "...", ...
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import tomllib

from common.errors import FlexPipeError
from common.runtime import runtime_dir


class ConfigError(FlexPipeError):
    """The configuration file or an override is invalid."""


_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


def parse_bytes(value: int | str) -> int:
    """``4096``, ``"512MiB"``, ``"24 GiB"`` or ``"1.5GB"`` as a byte count."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"a size cannot be negative: {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"not a size: {value!r} (use bytes or a number with KiB/MiB/GiB/TiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """Invariant: ``heartbeat_interval_s > 0`` and ``lost_after_heartbeats >= 1``."""

    ipc: str = ""
    tcp: str = ""
    heartbeat_interval_s: float = 1.0
    lost_after_heartbeats: int = 3
    allocator: str = ""

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0 or self.lost_after_heartbeats < 1:
            raise ConfigError("controller.heartbeat_interval_s must be > 0 and lost_after_heartbeats >= 1")

    @property
    def ipc_endpoint(self) -> str:
        return self.ipc or f"ipc://{runtime_dir()}/controller.sock"


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    key_dir: str = ""
    insecure: bool = False

    @property
    def key_path(self) -> Path:
        if self.key_dir:
            return Path(self.key_dir).expanduser()
        return Path(os.environ.get("FLEXPIPE_KEY_DIR") or Path.home() / ".config" / "flexpipe" / "keys")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Invariant: at least one worker, a positive worker memory, restart_limit >= 0, spawn_limit >= 0.

    ``spawn_limit`` is how many more workers the supervisor may start when a refactor needs them."""

    workers: int = 2
    worker_memory: int = 4 << 30
    restart_limit: int = 3
    ready_timeout_s: float = 60.0
    spawn_limit: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "worker_memory", parse_bytes(self.worker_memory))
        if (
            self.workers < 1
            or self.worker_memory <= 0
            or self.restart_limit < 0
            or self.ready_timeout_s <= 0
            or self.spawn_limit < 0
        ):
            raise ConfigError(f"invalid [cluster] settings: {self}")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Invariant: ``0 <= port <= 65535`` and ``max_waiting_requests >= 0``.

    A pipeline admits ``max_num_seqs`` running requests plus ``max_waiting_requests`` waiting ones;
    the gateway answers 429 beyond that (vLLM's API server has no bound; SGLang's is
    ``--max-queued-requests``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_waiting_requests: int = 256

    def __post_init__(self) -> None:
        if not self.host or not 0 <= self.port <= 65535 or self.max_waiting_requests < 0:
            raise ConfigError(f"invalid [gateway] settings: {self}")


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """Bounds the policy keeps one model within; ``name`` is the checkpoint directory's name.
    Invariant: ``0 <= min_replicas <= max_replicas`` and ``1 <= min_stages <= max_stages``."""

    name: str
    min_replicas: int = 1
    max_replicas: int = 4
    min_stages: int = 1
    max_stages: int = 4

    def __post_init__(self) -> None:
        if not (0 <= self.min_replicas <= self.max_replicas and 1 <= self.min_stages <= self.max_stages):
            raise ConfigError(f"invalid [[policy.model]] limits: {self}")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The autoscaling policy's settings (FlexPipe Eqs. 4, 5, 11; the paper gives no values, these are ours).

    Signals: ``window_s`` of arrivals give the rate and the CV of inter-arrival times (the paper's evaluation
    uses 15 s windows; 30 s halves the variance of the CV estimate at a few requests per second).
    Eq. 4: ``alpha`` weighs throughput against latency; a candidate of K stages suits the CV
    ``suited_cv_base * K ** suited_cv_exponent`` (the latency-optimal depth grows like sqrt(CV), Eq. 1's
    reading, so the suited CV grows like K^2); ``sigma`` is the CV distance that costs a factor e.
    Eq. 5: ``beta1 + beta2 * K`` is the coordination overhead per replica of K stages; demand is sized
    for ``target_utilization`` of each replica's throughput. Eq. 11: ``queue_capacity`` requests is a
    full queue (q-hat = 1), ``queue_beta``/``queue_gamma`` shape how fast a full, bursty queue expands.
    Stability: a change needs a score ``hysteresis`` better than the current one on ``confirm_intervals``
    consecutive decisions and ``cooldown_s`` since the model's last change; a replica is added within
    ``interval_s`` of the demand exceeding capacity and removed after ``scale_in_idle_s`` of less demand.
    The granularity changes only on windows of at least ``min_arrivals_for_cv`` arrivals (fewer gaps give a CV
    too noisy to re-shape a pipeline on). SLO: TTFT and TPOT targets (p99 over the window)."""

    mode: str = "flexpipe"
    interval_s: float = 5.0
    window_s: float = 30.0
    cooldown_s: float = 30.0
    confirm_intervals: int = 2
    hysteresis: float = 0.1
    scale_in_idle_s: float = 120.0
    alpha: float = 0.5
    sigma: float = 2.0
    suited_cv_base: float = 1.0
    suited_cv_exponent: float = 2.0
    beta1: float = 1.0
    beta2: float = 0.05
    target_utilization: float = 0.7
    queue_capacity: int = 32
    queue_beta: float = 0.0
    queue_gamma: float = 1.0
    min_arrivals_for_cv: int = 20
    congestion_intervals: int = 2
    congestion_min_queue: int = 2
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.5
    min_replicas: int = 1
    max_replicas: int = 4
    min_stages: int = 1
    max_stages: int = 4
    model: tuple[ModelLimits, ...] = ()

    def __post_init__(self) -> None:
        models = tuple(m if isinstance(m, ModelLimits) else _model_limits(m) for m in self.model)
        object.__setattr__(self, "model", models)
        if self.mode not in ("flexpipe", "static"):
            raise ConfigError(f"policy.mode must be 'flexpipe' or 'static', not {self.mode!r}")
        for name, rule in _POLICY_RULES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"policy.{name} must be a finite number, not {value!r}")
            if not rule[0](value):
                raise ConfigError(f"policy.{name} must be {rule[1]}, not {value!r}")
        if self.min_replicas > self.max_replicas or self.min_stages > self.max_stages:
            raise ConfigError(
                f"[policy] needs min_replicas <= max_replicas and min_stages <= max_stages, got replicas "
                f"{self.min_replicas}..{self.max_replicas}, stages {self.min_stages}..{self.max_stages}"
            )

    def limits(self, model_name: str) -> ModelLimits:
        """The bounds for ``model_name``: its ``[[policy.model]]`` entry, else the section's defaults."""
        for limits in self.model:
            if limits.name == model_name:
                return limits
        return ModelLimits(model_name, self.min_replicas, self.max_replicas, self.min_stages, self.max_stages)


_POSITIVE = (lambda v: v > 0, "> 0")
_NOT_NEGATIVE = (lambda v: v >= 0, ">= 0")
_AT_LEAST_ONE = (lambda v: v >= 1 and v == int(v), "an integer >= 1")
_POLICY_RULES = {
    "interval_s": _POSITIVE,
    "window_s": _POSITIVE,
    "cooldown_s": _NOT_NEGATIVE,
    "confirm_intervals": _AT_LEAST_ONE,
    "hysteresis": _NOT_NEGATIVE,
    "scale_in_idle_s": _NOT_NEGATIVE,
    "alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "sigma": _POSITIVE,
    "suited_cv_base": _POSITIVE,
    "suited_cv_exponent": _NOT_NEGATIVE,
    "beta1": _NOT_NEGATIVE,
    "beta2": _NOT_NEGATIVE,
    "target_utilization": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "queue_capacity": _AT_LEAST_ONE,
    "queue_beta": _NOT_NEGATIVE,
    "queue_gamma": _NOT_NEGATIVE,
    "min_arrivals_for_cv": _NOT_NEGATIVE,
    "congestion_intervals": _AT_LEAST_ONE,
    "congestion_min_queue": _NOT_NEGATIVE,
    "slo_ttft_s": _POSITIVE,
    "slo_tpot_s": _POSITIVE,
    "min_replicas": _NOT_NEGATIVE,
    "max_replicas": _AT_LEAST_ONE,
    "min_stages": _AT_LEAST_ONE,
    "max_stages": _AT_LEAST_ONE,
}


def _model_limits(entry) -> ModelLimits:
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"each [[policy.model]] needs a name: {entry!r}")
    try:
        return ModelLimits(**entry)
    except TypeError as exc:
        raise ConfigError(f"invalid [[policy.model]] entry {entry!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class FlexPipeConfig:
    """The root configuration, passed explicitly to every process."""

    controller: ControllerConfig = field(default_factory=ControllerConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    source: str = "defaults"


SECTIONS = {
    "controller": ControllerConfig,
    "security": SecurityConfig,
    "cluster": ClusterConfig,
    "gateway": GatewayConfig,
    "policy": PolicyConfig,
}


def default_config_path() -> Path:
    return Path.home() / ".config" / "flexpipe" / "flexpipe.toml"


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> FlexPipeConfig:
    """Read the configuration file (if any) and apply ``FLEXPIPE_<SECTION>_<FIELD>`` overrides."""
    environ = os.environ if environ is None else environ
    chosen = (
        path or environ.get("FLEXPIPE_CONFIG") or (default_config_path() if default_config_path().exists() else None)
    )
    raw: dict = {}
    if chosen:
        try:
            raw = tomllib.loads(Path(chosen).read_text())
        except FileNotFoundError:
            raise ConfigError(f"configuration file {chosen} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {chosen} is not valid TOML: {exc}") from None
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown configuration sections {sorted(unknown)}; known: {sorted(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = dict(raw.get(name, {}))
        known = {f.name: f for f in fields(cls)}
        if set(values) - set(known):
            raise ConfigError(f"unknown keys in [{name}]: {sorted(set(values) - set(known))}")
        for key in known:
            override = environ.get(f"FLEXPIPE_{name.upper()}_{key.upper()}")
            if override is not None:
                values[key] = _coerce(override, type(getattr(cls(), key)), f"FLEXPIPE_{name.upper()}_{key.upper()}")
        try:
            sections[name] = cls(**values)
        except TypeError as exc:
            raise ConfigError(f"invalid [{name}] section: {exc}") from None
    return FlexPipeConfig(**sections, source=str(chosen) if chosen else "defaults")


def _coerce(text: str, kind: type, name: str):
    try:
        if kind is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        return (
            kind(text)
            if kind in (int, float) and not (kind is int and not text.strip().lstrip("-").isdigit())
            else text
        )
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a valid {kind.__name__}") from None


def with_overrides(config: FlexPipeConfig, **sections) -> FlexPipeConfig:
    """A copy with some fields of some sections replaced, e.g. ``cluster={"workers": 3}``."""
    return replace(config, **{name: replace(getattr(config, name), **values) for name, values in sections.items()})
