"""Cost-balanced partitioning of a model's units into pipeline stages (FlexPipe Eq. 2).

For K stages S_1..S_K the partitioner minimises, exactly, by dynamic programming::

    sum_k |stage_cost(S_k) - C| + lambda * C * R(S_k)

* ``stage_cost(S) = t_c(S) + s_p(S) / B``: ``t_c`` is the stage's compute time for one
  step of ``tokens_per_step`` tokens; ``s_p`` is the residual-stream activation a stage
  receives per step (``activation_bytes_per_token * tokens_per_step``; zero for the
  stage that starts with ``embed``, which receives token ids). Parameter bytes are
  loaded once, so their per-step amortised share is taken as zero: they enter only
  through the memory limit.
* ``C`` is the mean stage cost, ``sum_k stage_cost(S_k) / K``. Every layout with K
  stages has the same K-1 cuts' worth of transfer, so ``C`` depends on K only.
* ``R(S) = 1`` when S starts inside a layer (between ``L{i}.attn`` and ``L{i}.mlp``),
  so that stages cut at layer boundaries can later merge cleanly.

Stage ``k`` must fit ``device_memory[k]``: ``stage_memory`` = parameter bytes + KV bytes
of its attn units for ``kv_tokens`` tokens + ``memory_reserve_bytes`` of activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from common.errors import PartitionError
from common.model.units import Layout, is_layer_boundary, unit_names


@dataclass(frozen=True, slots=True)
class UnitCost:
    """Cost of one model unit. Invariant: all sizes are >= 0; only attn units hold KV."""

    name: str
    flops_per_token: float
    param_bytes: int
    kv_bytes_per_token: int


@dataclass(frozen=True, slots=True)
class CostModel:
    """Hardware and workload constants of the partition objective.

    Invariant: ``flops_per_second`` and ``bandwidth_bytes_per_second`` are positive,
    every other field is >= 0. ``layer_cut_penalty`` (lambda) is a fraction of the mean
    stage cost C, so it is independent of the model's scale.
    """

    flops_per_second: float = 5e10
    bandwidth_bytes_per_second: float = 10e9
    activation_bytes_per_token: int = 0
    tokens_per_step: int = 256
    kv_tokens: int = 0
    layer_cut_penalty: float = 0.05
    memory_reserve_bytes: int = 0

    def __post_init__(self) -> None:
        if self.flops_per_second <= 0 or self.bandwidth_bytes_per_second <= 0:
            raise PartitionError("a cost model needs positive flops_per_second and bandwidth_bytes_per_second")
        others = (
            self.activation_bytes_per_token,
            self.tokens_per_step,
            self.kv_tokens,
            self.layer_cut_penalty,
            self.memory_reserve_bytes,
        )
        if min(others) < 0:
            raise PartitionError(f"cost model fields must be >= 0: {self}")

    @property
    def activation_transfer_seconds(self) -> float:
        """Time to receive one step's residual stream across a cut."""
        return self.activation_bytes_per_token * self.tokens_per_step / self.bandwidth_bytes_per_second


def unit_costs(spec, context_tokens: int = 0) -> list[UnitCost]:
    """Per-unit costs of a decoder-only model from its shape (biases ignored).

    An attention unit also pays for its scores and weighted values over
    ``context_tokens`` cached tokens per query token (4 * heads * head_dim FLOPs each);
    on small models that, not the projections, is most of a layer's time.

    ``spec`` has ``vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim,
    intermediate_size, tie_word_embeddings, dtype_bytes`` and optionally ``mlp_matrices``
    (3 for gated MLPs, the default; 2 for GPT-2). The head always holds its own copy of a
    tied embedding, since the first and the last stage each load it.
    """
    hidden, dtype = spec.hidden_size, spec.dtype_bytes
    vocab_matrix = spec.vocab_size * hidden
    attn_matmul = 2 * hidden * spec.num_heads * spec.head_dim + 2 * hidden * spec.num_kv_heads * spec.head_dim
    mlp_matmul = getattr(spec, "mlp_matrices", 3) * hidden * spec.intermediate_size
    kv_bytes = 2 * spec.num_kv_heads * spec.head_dim * dtype

    attention_over_context = 4.0 * spec.num_heads * spec.head_dim * context_tokens

    def cost(name: str, matmul_params: int, other_params: int, kv: int = 0, extra_flops: float = 0.0) -> UnitCost:
        return UnitCost(name, 2.0 * matmul_params + extra_flops, (matmul_params + other_params) * dtype, kv)

    units = [UnitCost("embed", 0.0, vocab_matrix * dtype, 0)]
    for name in unit_names(spec.num_layers)[1:-1]:
        if name.endswith(".attn"):
            units.append(cost(name, attn_matmul, hidden, kv_bytes, attention_over_context))
        else:
            units.append(cost(name, mlp_matmul, hidden))
    units.append(cost("head", vocab_matrix, hidden))
    return units


def stage_cost(units: Sequence[UnitCost], cost_model: CostModel) -> float:
    """Seconds per step of a stage: compute plus receiving its input (none when it starts with embed)."""
    compute = sum(u.flops_per_token for u in units) * cost_model.tokens_per_step / cost_model.flops_per_second
    receives_activations = bool(units) and units[0].name != "embed"
    return compute + (cost_model.activation_transfer_seconds if receives_activations else 0.0)


def stage_memory(units: Sequence[UnitCost], cost_model: CostModel) -> int:
    """Bytes a stage needs on its device: parameters, KV for ``kv_tokens``, activation reserve."""
    kv_per_token = sum(u.kv_bytes_per_token for u in units)
    return sum(u.param_bytes for u in units) + kv_per_token * cost_model.kv_tokens + cost_model.memory_reserve_bytes


def partition(
    units: Sequence[UnitCost],
    num_stages: int,
    cost_model: CostModel = CostModel(),
    device_memory: Sequence[int] | None = None,
) -> Layout:
    """The exact minimiser of the module's objective over layouts of ``num_stages`` contiguous stages.

    ``device_memory[k]`` bounds stage k's ``stage_memory`` (None: unlimited). A tie is
    broken deterministically, towards earlier cuts. Raises PartitionError when no layout fits.
    """
    num_units = len(units)
    if num_stages < 1:
        raise PartitionError(f"a layout needs at least 1 stage, got {num_stages}")
    if num_stages > num_units:
        raise PartitionError(
            f"a model of {num_units} units can be cut into at most {num_units} stages, got {num_stages}"
        )
    if device_memory is not None:
        if len(device_memory) != num_stages:
            raise PartitionError(f"device_memory lists {len(device_memory)} devices for {num_stages} stages")
        largest_device = max(device_memory)
        for unit in units:
            needed = stage_memory([unit], cost_model)
            if needed > largest_device:
                raise PartitionError(
                    f"unit {unit.name} needs {needed} bytes, more than the largest device ({largest_device})"
                )

    # prefix[j] sums units[:j]; matrices are indexed [start, end] for the stage units[start:end].
    def prefix(values) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(np.asarray(values))))

    seconds_per_flop = cost_model.tokens_per_step / cost_model.flops_per_second
    flops = prefix([float(u.flops_per_token) for u in units])
    transfer = np.array([0.0 if u.name == "embed" else cost_model.activation_transfer_seconds for u in units])
    cost = (flops[None, :] - flops[:-1, None]) * seconds_per_flop + transfer[:, None]
    mean_cost = (
        flops[-1] * seconds_per_flop + transfer[0] + (num_stages - 1) * cost_model.activation_transfer_seconds
    ) / num_stages
    names = [u.name for u in units]
    cuts_inside_layer = np.array([start > 0 and not is_layer_boundary(names, start) for start in range(num_units)])
    stage_terms = np.abs(cost - mean_cost) + (cost_model.layer_cut_penalty * mean_cost) * cuts_inside_layer[:, None]
    starts, ends = np.indices(cost.shape)
    stage_terms[ends <= starts] = np.inf

    if device_memory is not None:
        memory_per_unit = [u.param_bytes + u.kv_bytes_per_token * cost_model.kv_tokens for u in units]
        memory_prefix = prefix(np.array(memory_per_unit, dtype=np.int64))
        memory = memory_prefix[None, :] - memory_prefix[:-1, None] + cost_model.memory_reserve_bytes

    # best[end]: least objective of the first k stages covering units[:end]; choices[k][end]: their last start.
    best = np.full(num_units + 1, np.inf)
    best[0] = 0.0
    choices = []
    for stage in range(num_stages):
        terms = stage_terms if device_memory is None else np.where(memory <= device_memory[stage], stage_terms, np.inf)
        candidates = best[:-1, None] + terms
        choices.append(candidates.argmin(axis=0))
        best = candidates.min(axis=0)
    if not np.isfinite(best[num_units]):
        raise PartitionError(
            f"no layout of {num_units} units into {num_stages} stages fits device memory {list(device_memory or [])}"
        )

    bounds, end = [], num_units
    for stage in reversed(range(num_stages)):
        start = int(choices[stage][end])
        bounds.append((start, end))
        end = start
    return Layout(tuple(reversed(bounds)), num_units)


def partition_model(spec, num_stages: int, context_tokens: int, device_memory: Sequence[int] | None = None) -> Layout:
    """``partition`` of a model's units with the cost model its shape implies (the serving-time defaults)."""
    cost_model = CostModel(activation_bytes_per_token=spec.hidden_size * spec.dtype_bytes)
    return partition(unit_costs(spec, context_tokens=context_tokens), num_stages, cost_model, device_memory)
