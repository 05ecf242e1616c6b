"""Attention of a ragged micro-batch over a paged KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataplane.batch import BatchInput


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pool: torch.Tensor,
                    batch: BatchInput, scale: float, window: int | None = None) -> torch.Tensor:
    """Write the new keys/values into ``kv_pool`` and attend over each sequence's whole context.

    q: [T, heads, dim]; k, v: [T, kv_heads, dim]; kv_pool: [2, slots, kv_heads, dim].
    Returns [T, heads * dim].
    """
    kv_pool[0, batch.slot_mapping] = k.to(kv_pool.dtype)
    kv_pool[1, batch.slot_mapping] = v.to(kv_pool.dtype)
    layout = batch.attention_layout(window)
    num_seqs = len(batch.q_lens)
    padded_q = q.new_zeros(num_seqs, layout.max_q, q.shape[1], q.shape[2])
    padded_q[layout.query_rows, layout.query_cols] = q
    keys = kv_pool[0, layout.key_slots].to(q.dtype)
    values = kv_pool[1, layout.key_slots].to(q.dtype)
    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=layout.mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(1, 2)[layout.query_rows, layout.query_cols].reshape(q.shape[0], -1)
