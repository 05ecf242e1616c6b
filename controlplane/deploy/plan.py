"""Turning a deploy request into stage layouts and memory needs, from the model's config alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common import events as ev
from common.errors import InvalidRequestError
from common.model.context import resolve_max_model_len
from common.model.partition import partition_model, unit_costs
from common.model.sizes import dtype_bytes, kv_bytes_per_block
from common.model.spec import ModelSpec
from common.model.units import Layout, unit_names

ACTIVATION_RESERVE_BYTES = 64 << 20
FIXED_GROUP_TRANSPORTS = ("nccl", "gloo")


def check_deployable_transport(transport: str) -> None:
    """Raise ``InvalidRequestError`` for a transport whose torch.distributed process group is fixed at
    start-up: a pipeline re-shaped in flight cannot keep it."""
    if transport in FIXED_GROUP_TRANSPORTS:
        raise InvalidRequestError(
            f"the {transport} transport needs a torch.distributed process group fixed at start-up, which a "
            "pipeline re-shaped in flight cannot keep; use shm, tcp or cuda_ipc"
        )


@dataclass(frozen=True, slots=True)
class PipelinePlan:
    """Units and device bytes per stage, and the engine's limits.

    Invariant: the stages' units, in order, are every unit once."""

    stage_units: list[list[str]]
    stage_memory: list[int]
    num_kv_blocks: int
    max_model_len: int
    slot_bytes: int
    max_num_batched_tokens: int = 2048


def plan_pipeline(request: ev.DeployPipeline) -> PipelinePlan:
    """Cut the model into ``request.num_stages`` stages (or its explicit ``layout``) and size its KV cache:
    ``num_kv_blocks`` if given, else what ``kv_cache_bytes`` holds on the stage with the most layers,
    at most enough for ``max_num_seqs`` requests of the full context.

    Raises CheckpointError / UnsupportedModelError / PartitionError / InvalidRequestError."""
    check_deployable_transport(request.transport)
    spec = ModelSpec.from_dir(Path(request.model_dir))
    names = unit_names(spec.num_layers)
    element_bytes = dtype_bytes(request.dtype)
    max_model_len = resolve_max_model_len(spec, request.max_model_len)
    costs = unit_costs(spec, context_tokens=max_model_len // 2)
    cut = (
        Layout.from_spec(request.layout, names)
        if request.layout
        else partition_model(spec, request.num_stages, max_model_len // 2)
    )
    stage_units = [list(cut.stage_units(s, names)) for s in range(cut.num_stages)]
    per_block_layer = kv_bytes_per_block(request.block_size, spec.num_kv_heads, spec.head_dim, element_bytes)
    attn_layers = [sum(1 for u in units if u.endswith(".attn")) for units in stage_units]
    if request.num_kv_blocks > 0:
        num_kv_blocks = request.num_kv_blocks
    else:
        wanted = request.max_num_seqs * -(-max_model_len // request.block_size)
        num_kv_blocks = max(1, min(wanted, request.kv_cache_bytes // (per_block_layer * max(1, max(attn_layers)))))
    by_name = {c.name: c for c in costs}
    stage_memory = [
        sum(by_name[u].param_bytes for u in units) * element_bytes // spec.dtype_bytes
        + layers * num_kv_blocks * per_block_layer
        + ACTIVATION_RESERVE_BYTES
        for units, layers in zip(stage_units, attn_layers)
    ]
    batched = request.max_num_batched_tokens if request.max_num_batched_tokens > 0 else max(max_model_len, 2048)
    largest_step = batched * spec.hidden_size * 4  # the residual stream of the biggest micro-batch
    return PipelinePlan(
        stage_units, stage_memory, num_kv_blocks, max_model_len, max(1 << 20, largest_step + 4096), batched
    )
