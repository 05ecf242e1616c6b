"""Rotary position embeddings computed exactly as Hugging Face transformers computes them.

This mirrors ``transformers.modeling_rope_utils`` (``ROPE_INIT_FUNCTIONS`` and ``dynamic_rope_update``) and the
Llama rotary embedding, but imports only torch so that worker processes start fast.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.errors import CheckpointError, UnsupportedModelError
from common.model.architectures import SUPPORTED_ROPE_TYPES

_DEFAULT_THETA = 10_000.0
_USES_ORIGINAL_MAX = ("yarn", "longrope", "llama3")
_SEQ_LEN_DEPENDENT = ("dynamic", "longrope")


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """Everything that determines a model's rotary embedding, in a hashable form.

    Invariants:

    * ``rope_type`` is one of ``SUPPORTED_ROPE_TYPES``.
    * ``rotary_dim`` is even and positive; the first ``rotary_dim`` dims of every head are rotated, the rest
      (partial rotary) pass through unchanged.
    * ``params`` holds, sorted by name, exactly the scaling parameters ``rope_type`` uses, with every default
      already resolved the way transformers resolves it (yarn/longrope ``attention_factor``, yarn ``beta_*`` and
      ``truncate``, ``original_max_position_embeddings``); sequences are tuples. Equal specs therefore give
      identical embeddings, and a spec can be hashed, compared and sent to worker processes.
    * ``inv_freq_and_scaling`` and ``cos_sin`` are pure functions of the spec and their arguments; unlike
      transformers' module, nothing is cached between forward calls that could change a result.
    """

    rope_type: str
    theta: float
    rotary_dim: int
    max_position_embeddings: int
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {self.rope_type!r} is not supported; supported types: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise UnsupportedModelError(f"the rotary dimension must be even and positive, got {self.rotary_dim}")

    @classmethod
    def from_hf_config(cls, config: dict, head_dim: int) -> RopeSpec:
        """Reads a raw config.json dict in the transformers v5 (``rope_parameters``) or v4 (``rope_scaling``,
        ``rope_theta``) form."""
        rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        if any(isinstance(value, dict) for value in rope.values()):
            raise UnsupportedModelError("RoPE parameters that differ per layer type are not supported")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {rope_type!r} is not supported; supported types: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        theta = _first_set(rope.get("rope_theta"), config.get("rope_theta"), _DEFAULT_THETA)
        partial = _first_set(rope.get("partial_rotary_factor"), config.get("partial_rotary_factor"), 1.0)
        rotary_dim = int(head_dim * partial)
        max_pos = config.get("max_position_embeddings")
        if max_pos is None:
            raise CheckpointError("config.json lacks max_position_embeddings")
        if rope_type in _USES_ORIGINAL_MAX:
            # As in transformers, a top-level value (Phi-3 style) overrides the one inside the RoPE dict.
            rope["original_max_position_embeddings"] = _first_set(
                config.get("original_max_position_embeddings"), rope.get("original_max_position_embeddings"), max_pos
            )
        try:
            params = _resolve_params(rope_type, rope, int(max_pos), rotary_dim)
        except KeyError as missing:
            raise CheckpointError(f"RoPE parameters of type {rope_type!r} lack {missing}") from None
        return cls(rope_type, float(theta), rotary_dim, int(max_pos), tuple(sorted(params.items())))

    def inv_freq_and_scaling(self, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        """Returns the float32 inverse frequencies, shape [rotary_dim // 2], and the factor cos/sin are scaled by.

        ``seq_len`` (the largest position of a forward call + 1) matters only to "dynamic" and "longrope".
        """
        p = dict(self.params)
        dim = self.rotary_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        if self.rope_type == "default":
            return 1.0 / (self.theta**exponents), 1.0
        if self.rope_type == "linear":
            return 1.0 / (self.theta**exponents) / p["factor"], 1.0
        if self.rope_type == "dynamic":
            base: float | torch.Tensor = self.theta
            if seq_len is not None and seq_len > self.max_position_embeddings:
                # transformers passes seq_len as an int64 tensor, which makes this arithmetic float32.
                seq = torch.tensor(seq_len, dtype=torch.int64)
                factor = p["factor"]
                base = self.theta * ((factor * seq / self.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
            return 1.0 / (base**exponents), 1.0
        if self.rope_type == "yarn":
            return _yarn_inv_freq(self.theta, dim, exponents, p), p["attention_factor"]
        if self.rope_type == "longrope":
            is_long = seq_len is not None and seq_len > p["original_max_position_embeddings"]
            ext_factors = torch.tensor(p["long_factor" if is_long else "short_factor"], dtype=torch.float32)
            return 1.0 / (ext_factors * self.theta**exponents), p["attention_factor"]
        return _llama3_inv_freq(1.0 / (self.theta**exponents), p), 1.0

    def cos_sin(
        self,
        positions: torch.Tensor,
        dtype: torch.dtype,
        context_lens: np.ndarray | None = None,
        q_lens: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, shape [num_tokens, rotary_dim], for the absolute ``positions`` of a flat token batch.

        With ``context_lens`` and ``q_lens`` (int64 [num_seqs]: sequence b brings ``q_lens[b]`` consecutive
        tokens whose positions end at ``context_lens[b] - 1``, as in ``BatchInput``), the "dynamic" and "longrope"
        tables of each sequence come from its own seq_len ``context_lens[b]``, which is what transformers uses when
        that sequence runs alone; without them, from the largest position of the whole batch."""
        if self.rope_type not in _SEQ_LEN_DEPENDENT or positions.numel() == 0:
            inv_freq, scaling = _inv_freq_on(self, None, positions.device)
            return _cos_sin(positions, inv_freq, scaling, dtype)
        if context_lens is None or q_lens is None:  # the whole batch as one sequence
            context_lens, q_lens = np.array([int(positions.max()) + 1]), np.array([positions.numel()])
        keys = self._seq_len_keys(np.asarray(context_lens))
        if keys.min() == keys.max():
            inv_freq, scaling = _inv_freq_on(self, int(keys[0]) or None, positions.device)
            return _cos_sin(positions, inv_freq, scaling, dtype)
        distinct, group = np.unique(keys, return_inverse=True)
        tables = [_inv_freq_on(self, int(key) or None, positions.device) for key in distinct]
        token_group = torch.from_numpy(np.repeat(group.reshape(-1), np.asarray(q_lens))).to(positions.device)
        inv_freq = torch.stack([table for table, _ in tables])[token_group]
        scalings = {scaling for _, scaling in tables}
        if len(scalings) == 1:
            scaling: float | torch.Tensor = scalings.pop()
        else:
            scaling = torch.tensor([s for _, s in tables], dtype=torch.float32, device=positions.device)[token_group]
            scaling = scaling[:, None]
        return _cos_sin(positions, inv_freq, scaling, dtype)

    def _seq_len_keys(self, seq_lens: np.ndarray) -> np.ndarray:
        """Per seq_len, the seq_len its table is computed for, 0 where that is the table of no seq_len:
        "dynamic" rescales beyond ``max_position_embeddings``, "longrope" switches to its long factors beyond
        ``original_max_position_embeddings`` (as ``dynamic_rope_update`` does)."""
        if self.rope_type == "dynamic":
            return np.where(seq_lens > self.max_position_embeddings, seq_lens, 0)
        original = dict(self.params)["original_max_position_embeddings"]
        return np.where(seq_lens > original, original + 1, 0)


def _cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float | torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rotary(q_or_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first ``cos.shape[-1]`` dims of each head of ``q_or_k`` [num_tokens, num_heads, head_dim]."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    x_rot, x_pass = q_or_k[..., :rotary_dim], q_or_k[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


@functools.lru_cache(maxsize=64)
def _inv_freq_on(spec: RopeSpec, seq_len: int | None, device: torch.device) -> tuple[torch.Tensor, float]:
    # Cached per device so that a forward call does not copy the table from the host (which would synchronize).
    inv_freq, scaling = spec.inv_freq_and_scaling(seq_len)
    return inv_freq.to(device), scaling


def _first_set(*values: Any) -> Any:
    return next(value for value in values if value is not None)


def _resolve_params(rope_type: str, rope: dict, max_pos: int, rotary_dim: int) -> dict[str, Any]:
    if rope_type == "default":
        return {}
    if rope_type in ("linear", "dynamic"):
        return {"factor": float(rope["factor"])}
    original = int(rope["original_max_position_embeddings"])
    if rope_type == "llama3":
        names = ("factor", "low_freq_factor", "high_freq_factor")
        return {"original_max_position_embeddings": original, **{name: float(rope[name]) for name in names}}
    factor = rope["factor"] if rope_type == "yarn" else rope.get("factor")
    if factor is None:
        factor = max_pos / original
    attention_factor = rope.get("attention_factor")
    if rope_type == "yarn":
        if attention_factor is None:
            mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(factor)
        return {
            "original_max_position_embeddings": original,
            "factor": float(factor),
            "attention_factor": float(attention_factor),
            "beta_fast": float(rope.get("beta_fast") or 32),
            "beta_slow": float(rope.get("beta_slow") or 1),
            "truncate": bool(rope.get("truncate", True)),
        }
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short_factor, long_factor = tuple(map(float, rope["short_factor"])), tuple(map(float, rope["long_factor"]))
    if len(short_factor) != rotary_dim // 2 or len(long_factor) != rotary_dim // 2:
        raise CheckpointError(f"longrope short_factor and long_factor must have {rotary_dim // 2} entries")
    return {
        "original_max_position_embeddings": original,
        "factor": float(factor),
        "attention_factor": float(attention_factor),
        "short_factor": short_factor,
        "long_factor": long_factor,
    }


def _yarn_mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(base: float, dim: int, exponents: torch.Tensor, p: dict) -> torch.Tensor:
    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(p["original_max_position_embeddings"] / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(p["beta_fast"]), correction_dim(p["beta_slow"])
    if p["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base**exponents
    extrapolation_factor = 1 - ramp
    return (1.0 / (p["factor"] * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low_freq_factor, high_freq_factor = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context_len = p["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * scaled / factor + smooth_factor * scaled
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed, scaled)


def interleave_rotary_rows(weight: torch.Tensor, num_heads: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Reorder a q or k projection's output rows so each head's rotary dims come as pairs
    ``(i, i + rotary_dim/2)`` side by side, the layout ``apply_rotary_interleaved`` rotates.

    q.k products are unchanged because q and k get the same order; works on weights
    [heads * head_dim, in] and biases [heads * head_dim]."""
    half = rotary_dim // 2
    pairs = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).reshape(-1)
    order = torch.cat((pairs, torch.arange(rotary_dim, head_dim)))
    rows = (torch.arange(num_heads)[:, None] * head_dim + order).reshape(-1)
    return weight[rows].contiguous()


def rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The complex form of ``cos_sin``'s tables, shape [num_tokens, 1, rotary_dim // 2]."""
    half = cos.shape[-1] // 2
    return torch.complex(cos[:, :half].float(), sin[:, :half].float())[:, None, :]


def apply_rotary_interleaved(x: torch.Tensor, rotation_table: torch.Tensor) -> torch.Tensor:
    """``apply_rotary`` for heads whose rotary dims are interleaved (see ``interleave_rotary_rows``):
    one complex product per pair. x: [num_tokens, num_heads, head_dim]."""
    rotary_dim = 2 * rotation_table.shape[-1]
    rotated = x[..., :rotary_dim].float().unflatten(-1, (-1, 2))
    out = torch.view_as_real(torch.view_as_complex(rotated) * rotation_table).flatten(-2).to(x.dtype)
    return torch.cat((out, x[..., rotary_dim:]), dim=-1) if rotary_dim < x.shape[-1] else out
