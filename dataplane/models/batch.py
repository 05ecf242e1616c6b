"""Per-micro-batch tensors every stage derives from the micro-batch header.

The index arithmetic runs in numpy: these arrays hold a few hundred entries, where a
numpy operation costs a fraction of a torch dispatch, and the result is shared with
torch without a copy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class AttentionLayout:
    """Padded view of a ragged batch: B sequences x max_q queries x max_ctx keys.

    ``query_rows``/``query_cols`` place each flat token in the padded grid (None when
    every sequence brings ``max_q`` tokens, so the flat tokens already form the grid);
    ``key_slots`` are the KV-pool slot indices of the grid's keys, flattened row-major;
    ``mask`` is additive, [B, 1, max_q, max_ctx] float32: 0 where a query may attend to a
    key (causal, within the sequence's context and sliding window), -inf elsewhere.
    """

    query_rows: torch.Tensor | None
    query_cols: torch.Tensor | None
    key_slots: torch.Tensor
    mask: torch.Tensor
    max_q: int
    max_ctx: int


@dataclass(slots=True)
class BatchInput:
    """A micro-batch as tensors: flat tokens of several sequences, each with its own block table.

    Invariant: sequence b contributes ``q_lens[b]`` consecutive tokens whose positions
    end at ``context_lens[b] - 1``; the KV of every earlier position is already in the pool.
    ``block_tables`` is the tables padded with block 0 to a rectangle; padded entries are
    never read unmasked.
    """

    token_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    logits_indices: torch.Tensor
    q_lens: np.ndarray
    context_lens: np.ndarray
    block_tables: np.ndarray
    block_size: int
    _cache: dict = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        token_ids: Sequence[Sequence[int]],
        start_positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> BatchInput:
        q_lens = np.fromiter(map(len, token_ids), dtype=np.int64, count=len(token_ids))
        total = int(q_lens.sum())
        flat_tokens = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=total)
        seq_index = np.repeat(np.arange(len(q_lens)), q_lens)
        first_index = np.cumsum(q_lens) - q_lens
        starts = np.asarray(start_positions, dtype=np.int64)
        positions = starts[seq_index] + np.arange(total) - first_index[seq_index]
        width = max(map(len, block_tables), default=0)
        tables = np.zeros((len(block_tables), max(width, 1)), dtype=np.int64)
        for row, table in zip(tables, block_tables):
            row[: len(table)] = table
        slots = tables[seq_index, positions // block_size] * block_size + positions % block_size
        as_tensor = lambda values: torch.from_numpy(values).to(device)  # noqa: E731
        return cls(
            as_tensor(flat_tokens),
            as_tensor(positions),
            as_tensor(slots),
            as_tensor(first_index + q_lens - 1),
            q_lens,
            starts + q_lens,
            tables,
            block_size,
        )

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)

    def memo(self, key, compute):
        """Values shared by all units of a stage for this micro-batch (rope tables, masks)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def shared_tensors(self) -> list[torch.Tensor]:
        """What this stage derived that the next stage would derive again (the rope table and the
        full-context attention layout), as plain tensors led by a manifest; see ``adopt``."""
        manifest, tensors = [], []
        if "rope" in self._cache:
            manifest.append(1)
            tensors.append(torch.view_as_real(self._cache["rope"]))
        layout = self._cache.get(("attention", None))
        if layout is not None:
            padded = layout.query_rows is not None
            manifest += [2, layout.max_q, layout.max_ctx, int(padded)]
            tensors += [layout.key_slots, layout.mask] + ([layout.query_rows, layout.query_cols] if padded else [])
        return [torch.tensor(manifest, dtype=torch.long), *tensors] if manifest else []

    def adopt(self, tensors: list[torch.Tensor]) -> None:
        """Take over what the previous stage derived (``shared_tensors``); valid while ``tensors`` are."""
        if not tensors:
            return
        manifest, rest = tensors[0].tolist(), iter(tensors[1:])
        position = 0
        while position < len(manifest):
            if manifest[position] == 1:
                self._cache["rope"] = torch.view_as_complex(next(rest))
                position += 1
            else:
                max_q, max_ctx, padded = manifest[position + 1 : position + 4]
                key_slots, mask = next(rest), next(rest)
                rows, cols = (next(rest), next(rest)) if padded else (None, None)
                self._cache[("attention", None)] = AttentionLayout(rows, cols, key_slots, mask, max_q, max_ctx)
                position += 4

    def attention_layout(self, window: int | None) -> AttentionLayout:
        """The whole micro-batch as one padded grid (every sequence padded to the longest query and context)."""
        return self.memo(("attention", window), lambda: self._layout(np.arange(self.num_seqs), window))

    def attention_groups(self, window: int | None) -> list[tuple[torch.Tensor | slice, AttentionLayout]] | None:
        """Where one padded grid would waste most of its work (a long prefill next to decodes), the batch
        in groups that need no query padding: all one-token sequences together, and each longer one
        alone; as (the group's flat token indices, its layout). None where one grid is as good."""
        return self.memo(("attention-groups", window), lambda: self._groups(window))

    def _groups(self, window: int | None) -> list[tuple[torch.Tensor | slice, AttentionLayout]] | None:
        q_lens, ctx = self.q_lens, self.context_lens
        if self.num_seqs == 1 or int(q_lens.min()) == int(q_lens.max()):
            return None
        single = q_lens == 1
        grouped_cost = int(single.sum()) * int(ctx[single].max(initial=0)) + int((q_lens * ctx)[~single].sum())
        if self.num_seqs * int(q_lens.max()) * int(ctx.max()) <= 2 * grouped_cost:
            return None
        first = np.cumsum(q_lens) - q_lens
        groups: list[tuple[torch.Tensor | slice, AttentionLayout]] = []
        if single.any():
            members = np.flatnonzero(single)
            tokens = torch.from_numpy(first[members]).to(self.token_ids.device)
            groups.append((tokens, self._layout(members, window)))
        for b in np.flatnonzero(~single):
            groups.append((slice(int(first[b]), int(first[b] + q_lens[b])), self._layout(np.array([b]), window)))
        return groups

    def _layout(self, members: np.ndarray, window: int | None) -> AttentionLayout:
        """The padded grid of the sequences ``members`` (indices into the batch, in batch order)."""
        device = self.token_ids.device
        q_lens, ctx, tables = self.q_lens[members], self.context_lens[members], self.block_tables[members]
        max_q, max_ctx = int(q_lens.max()), int(ctx.max())
        key_pos = np.arange(max_ctx)
        key_slots = tables[:, key_pos // self.block_size] * self.block_size + key_pos % self.block_size
        query_pos = (ctx - q_lens)[:, None, None] + np.arange(max_q)[None, :, None]
        keys = key_pos[None, None, :]
        mask = (keys <= query_pos) & (keys < ctx[:, None, None])
        if window is not None:
            mask &= query_pos - keys < window
        rows = cols = None
        if int(q_lens.min()) != max_q:
            seq_index = np.repeat(np.arange(len(q_lens)), q_lens)
            rows = torch.from_numpy(seq_index).to(device)
            cols = self.positions - torch.from_numpy((ctx - q_lens)[seq_index]).to(device)
            mask[:, :, 0] |= ~mask.any(axis=-1)  # padded query rows attend somewhere so SDPA stays finite
        additive = np.where(mask[:, None], np.float32(0.0), np.float32(-np.inf))
        return AttentionLayout(
            rows,
            cols,
            torch.from_numpy(key_slots.reshape(-1)).to(device),
            torch.from_numpy(additive).to(device),
            max_q,
            max_ctx,
        )
