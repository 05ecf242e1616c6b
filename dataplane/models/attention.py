"""Attention of a ragged micro-batch over a paged KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataplane.models.batch import AttentionLayout, BatchInput


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_pool: torch.Tensor,
    batch: BatchInput,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Write the new keys/values into ``kv_pool`` and attend over each sequence's whole context.

    q: [T, heads, dim]; k, v: [T, kv_heads, dim]; kv_pool: [2, slots, kv_heads, dim].
    Returns [T, heads * dim].
    """
    keys_pool, values_pool = kv_pool[0], kv_pool[1]
    keys_pool.index_copy_(0, batch.slot_mapping, k if k.dtype == kv_pool.dtype else k.to(kv_pool.dtype))
    values_pool.index_copy_(0, batch.slot_mapping, v if v.dtype == kv_pool.dtype else v.to(kv_pool.dtype))
    groups = batch.attention_groups(window)
    if groups is None:
        return _attend(q, keys_pool, values_pool, batch.attention_layout(window), scale)
    out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
    for tokens, layout in groups:
        out[tokens] = _attend(q[tokens], keys_pool, values_pool, layout, scale)
    return out


def _attend(
    q: torch.Tensor,
    keys_pool: torch.Tensor,
    values_pool: torch.Tensor,
    layout: AttentionLayout,
    scale: float,
) -> torch.Tensor:
    """Attention of the sequences laid out by ``layout``; q: [T, heads, dim] -> [T, heads * dim]."""
    num_seqs, heads, dim, kv_heads = layout.mask.shape[0], q.shape[1], q.shape[2], keys_pool.shape[1]
    if layout.query_rows is None:
        padded_q = q.reshape(num_seqs, layout.max_q, heads, dim)
    else:
        padded_q = q.new_zeros(num_seqs, layout.max_q, heads, dim)
        padded_q[layout.query_rows, layout.query_cols] = q
    grid = (num_seqs, layout.max_ctx, kv_heads, dim)
    keys = keys_pool.index_select(0, layout.key_slots).view(grid)
    values = values_pool.index_select(0, layout.key_slots).view(grid)
    if keys.dtype != q.dtype:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    mask = layout.mask if layout.mask.dtype == q.dtype else layout.mask.to(q.dtype)
    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=heads != kv_heads,
    ).transpose(1, 2)
    if layout.query_rows is not None:
        out = out[layout.query_rows, layout.query_cols]
    return out.reshape(q.shape[0], heads * dim)


def new_kv_pool(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """One layer's pool: [2 (key, value), num_blocks * block_size slots, kv_heads, head_dim]."""
    return torch.zeros(2, num_blocks * block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
