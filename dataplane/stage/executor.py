"""A pipeline stage: the weights of a contiguous run of units, their KV pools, and their forward."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from common.errors import InvalidRequestError
from common.model.spec import ModelSpec
from common.model.units import unit_layer
from dataplane.models import adapter_for
from dataplane.models.attention import new_kv_pool
from dataplane.models.batch import BatchInput
from dataplane.models.checkpoint import CheckpointReader
from dataplane.stage.unit_state import KV_POOL_ATTRIBUTE, unit_bytes, unit_tensors, with_pool

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InvalidRequestError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True, slots=True)
class StageSpec:
    """What one stage runs. Invariant: ``units`` are contiguous in model order."""

    model_dir: str
    units: tuple[str, ...]
    num_kv_blocks: int
    block_size: int
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def is_first(self) -> bool:
        return self.units[0] == "embed"

    @property
    def is_last(self) -> bool:
        return self.units[-1] == "head"


class StageExecutor:
    """Runs a stage's units over micro-batches.

    Invariants: only the checkpoint tensors of units not ``provided`` are read (see
    ``tensors_read``); each owned attention layer has one KV pool whose slots are
    indexed by the engine's block ids, plus one scratch block (id ``num_kv_blocks``) the
    engine never hands out, which ``warm_up`` writes. A provided unit that still holds its KV pool
    (``resident``: served by this worker in the previous epoch) keeps that very pool,
    so its cache carries over untouched; any other attention unit gets a fresh pool.
    """

    def __init__(
        self, spec: StageSpec, provided: Mapping[str, object] | None = None, sources: Mapping[str, str] | None = None
    ) -> None:
        self.spec = spec
        provided = provided or {}
        self.model = ModelSpec.from_dir(spec.model_dir)
        self.device = torch.device(spec.device)
        dtype = resolve_dtype(spec.dtype)
        reader = CheckpointReader(Path(spec.model_dir))
        adapter = adapter_for(self.model, set(reader.weight_map))
        names = [n for unit in spec.units if unit not in provided for n in adapter.tensor_names(unit)]
        tensors = {k: v.to(self.device) for k, v in reader.read(names, dtype).items()}
        self.tensors_read = list(reader.tensors_read)
        self.sources = {unit: (sources or {}).get(unit, "disk") if unit in provided else "disk" for unit in spec.units}
        self.kv_pools: dict[int, torch.Tensor] = {}
        self.fresh_kv_bytes = 0
        self.units = []
        for unit in spec.units:
            given = provided.get(unit)
            pool = getattr(given, KV_POOL_ATTRIBUTE, None)
            if unit.endswith(".attn") and pool is None:
                pool = new_kv_pool(
                    spec.num_kv_blocks + 1,
                    spec.block_size,
                    self.model.num_kv_heads,
                    self.model.head_dim,
                    dtype,
                    self.device,
                )
                self.fresh_kv_bytes += pool.numel() * pool.element_size()
            if pool is not None:
                self.kv_pools[unit_layer(unit)] = pool
            built = adapter.build(unit, tensors, pool) if given is None else with_pool(given, pool)
            self.units.append(built)
        self.unit_by_name = dict(zip(spec.units, self.units))
        distinct = {t.data_ptr(): t for u in self.units for t in unit_tensors(u).values()}
        self.param_bytes = sum(t.numel() * t.element_size() for t in distinct.values())

    def warm_up(self, num_seqs: int = 16, rounds: int = 3, max_blocks: int = 8) -> None:
        """Run a few decode-shaped micro-batches of throw-away tokens over the scratch KV block, so the
        first real micro-batches do not pay first-use costs (kernel set-up, allocator growth) while
        serving. Contexts span 1..``max_blocks`` blocks (the scratch block repeated), as real ones do."""
        scratch, block_size = self.spec.num_kv_blocks, self.spec.block_size
        max_blocks = max(1, min(max_blocks, self.model.max_position_embeddings // block_size))
        for r in range(rounds):
            blocks = [1 + (i + r) % max_blocks for i in range(num_seqs)]
            batch = BatchInput.build(
                [[1]] * num_seqs,
                [n * block_size - 1 for n in blocks],
                [[scratch] * n for n in blocks],
                block_size,
                self.device,
            )
            hidden = (
                None
                if self.spec.is_first
                else torch.zeros(
                    num_seqs, self.model.hidden_size, dtype=resolve_dtype(self.spec.dtype), device=self.device
                )
            )
            self.forward(batch, hidden)

    def bytes_by_source(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for name, unit in self.unit_by_name.items():
            totals[self.sources[name]] = totals.get(self.sources[name], 0) + unit_bytes(unit)
        return totals

    @property
    def kv_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.kv_pools.values())

    def forward(self, batch: BatchInput, hidden: torch.Tensor | None) -> torch.Tensor:
        """Residual stream in, residual stream out; the last stage returns logits of each sequence's last token."""
        with torch.inference_mode():
            for unit in self.units:
                hidden = unit.forward(hidden, batch)
        return hidden
