"""Paged KV cache: block ids handed out by the engine, block pools held by stages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.errors import InvalidRequestError


class BlockAllocator:
    """Hands out KV block ids shared by every layer of a pipeline.

    Invariant: every block id in ``0..num_blocks`` is either free or owned by exactly
    one sequence; ``num_free`` + blocks held == ``num_blocks``.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise InvalidRequestError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise RuntimeError(f"asked for {num_blocks} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(num_blocks)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(reversed(block_ids))


def new_kv_pool(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """One layer's pool: [2 (key, value), num_blocks * block_size slots, kv_heads, head_dim]."""
    return torch.zeros(2, num_blocks * block_size, num_kv_heads, head_dim, dtype=dtype, device=device)


def kv_bytes_per_block(block_size: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    return 2 * block_size * num_kv_heads * head_dim * dtype_bytes


@dataclass(frozen=True, slots=True)
class Watermark:
    """KV of positions ``[0, upto)`` of a request, held in blocks ``table``, has been copied."""

    table: tuple[int, ...]
    upto: int


PRECOPY_ROUNDS = 3  # KV pre-copy rounds before SWITCH, at most
PRECOPY_SMALL_SLOTS = 64  # a later round whose delta is this small is left to SWITCH


def slots_since(marks: dict[int, Watermark], snapshot, block_size: int) -> tuple[np.ndarray, dict[int, Watermark]]:
    """The KV slots written since ``marks`` by each (request id, block table, positions written) of
    ``snapshot``, and the watermarks after copying them. A request whose blocks changed (preempted
    and readmitted) starts again from position 0."""
    parts, new_marks = [], {}
    for seq_id, table, computed in snapshot:
        table = tuple(table)
        mark = marks.get(seq_id)
        start = mark.upto if mark is not None and table[:len(mark.table)] == mark.table else 0
        if computed > start:
            positions = np.arange(start, computed, dtype=np.int64)
            blocks = np.asarray(table, dtype=np.int64)[positions // block_size]
            parts.append(blocks * block_size + positions % block_size)
        new_marks[seq_id] = Watermark(table, max(start, computed))
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), new_marks
