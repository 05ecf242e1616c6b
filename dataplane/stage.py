"""A pipeline stage: the weights of a contiguous run of units, their KV pools, and their forward."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import InvalidRequestError
from dataplane.batch import BatchInput
from dataplane.kv_cache import new_kv_pool
from dataplane.models import adapter_for
from dataplane.models.checkpoint import CheckpointReader, read_config
from dataplane.models.spec import ModelSpec
from dataplane.units import unit_layer

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

    Invariants: only the checkpoint tensors of ``spec.units`` are read (see
    ``tensors_read``); each owned attention layer has one KV pool whose slots are
    indexed by the engine's block ids.
    """

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        self.model = ModelSpec.from_config(read_config(spec.model_dir))
        self.device = torch.device(spec.device)
        dtype = resolve_dtype(spec.dtype)
        reader = CheckpointReader(Path(spec.model_dir))
        adapter = adapter_for(self.model, set(reader.weight_map))
        names = [n for unit in spec.units for n in adapter.tensor_names(unit)]
        tensors = {k: v.to(self.device) for k, v in reader.read(names, dtype).items()}
        self.tensors_read = list(reader.tensors_read)
        self.param_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.kv_pools: dict[int, torch.Tensor] = {}
        self.units = []
        for unit in spec.units:
            pool = None
            if unit.endswith(".attn"):
                pool = new_kv_pool(spec.num_kv_blocks, spec.block_size, self.model.num_kv_heads,
                                   self.model.head_dim, dtype, self.device)
                self.kv_pools[unit_layer(unit)] = pool
            self.units.append(adapter.build(unit, tensors, pool))

    @property
    def kv_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.kv_pools.values())

    def forward(self, batch: BatchInput, hidden: torch.Tensor | None) -> torch.Tensor:
        """Residual stream in, residual stream out; the last stage returns logits of each sequence's last token."""
        with torch.inference_mode():
            for unit in self.units:
                hidden = unit.forward(hidden, batch)
        return hidden
