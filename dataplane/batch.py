"""Per-micro-batch tensors every stage derives from the micro-batch header."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True, slots=True)
class AttentionLayout:
    """Padded view of a ragged batch: B sequences x max_q queries x max_ctx keys.

    ``query_rows``/``query_cols`` place each flat token in the padded grid;
    ``key_slots`` are KV-pool slot indices; ``mask`` is True where a query may
    attend to a key (causal, within the sequence's context and sliding window).
    """

    query_rows: torch.Tensor
    query_cols: torch.Tensor
    key_slots: torch.Tensor
    mask: torch.Tensor
    max_q: int


@dataclass(slots=True)
class BatchInput:
    """A micro-batch as tensors: flat tokens of several sequences, each with its own block table.

    Invariant: sequence b contributes ``q_lens[b]`` consecutive tokens whose positions
    end at ``context_lens[b] - 1``; the KV of every earlier position is already in the pool.
    """

    token_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    logits_indices: torch.Tensor
    q_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    block_size: int
    _cache: dict = field(default_factory=dict)

    @classmethod
    def build(cls, token_ids: Sequence[Sequence[int]], start_positions: Sequence[int],
              block_tables: Sequence[Sequence[int]], block_size: int, device: torch.device | str = "cpu") -> "BatchInput":
        flat_tokens, positions, slots, last_index = [], [], [], []
        q_lens, context_lens = [], []
        for tokens, start, table in zip(token_ids, start_positions, block_tables):
            seq_positions = range(start, start + len(tokens))
            flat_tokens.extend(tokens)
            positions.extend(seq_positions)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in seq_positions)
            last_index.append(len(flat_tokens) - 1)
            q_lens.append(len(tokens))
            context_lens.append(start + len(tokens))
        as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return cls(as_long(flat_tokens), as_long(positions), as_long(slots), as_long(last_index),
                   q_lens, context_lens, [list(t) for t in block_tables], block_size)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def memo(self, key, compute):
        """Values shared by all units of a stage for this micro-batch (rope tables, masks)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def attention_layout(self, window: int | None) -> AttentionLayout:
        return self.memo(("attention", window), lambda: self._attention_layout(window))

    def _attention_layout(self, window: int | None) -> AttentionLayout:
        device = self.token_ids.device
        num_seqs, max_q, max_ctx = len(self.q_lens), max(self.q_lens), max(self.context_lens)
        rows = torch.repeat_interleave(torch.arange(num_seqs), torch.tensor(self.q_lens))
        cols = torch.cat([torch.arange(n) for n in self.q_lens])
        key_pos = torch.arange(max_ctx)
        tables = torch.zeros(num_seqs, (max_ctx + self.block_size - 1) // self.block_size, dtype=torch.long)
        for b, table in enumerate(self.block_tables):
            used = min(len(table), tables.shape[1])
            tables[b, :used] = torch.tensor(table[:used], dtype=torch.long)
        key_slots = tables[:, key_pos // self.block_size] * self.block_size + key_pos % self.block_size
        ctx = torch.tensor(self.context_lens).view(-1, 1, 1)
        query_pos = ctx - torch.tensor(self.q_lens).view(-1, 1, 1) + torch.arange(max_q).view(1, -1, 1)
        mask = (key_pos.view(1, 1, -1) <= query_pos) & (key_pos.view(1, 1, -1) < ctx)
        if window is not None:
            mask &= query_pos - key_pos.view(1, 1, -1) < window
        mask[:, :, 0] |= ~mask.any(dim=-1)  # padded query rows attend somewhere so SDPA stays finite
        return AttentionLayout(rows.to(device), cols.to(device), key_slots.to(device),
                               mask.unsqueeze(1).to(device), max_q)
