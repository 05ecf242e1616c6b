"""Byte sizes of what a stage holds: element sizes of the serving dtypes and KV blocks."""

from __future__ import annotations

from common.errors import InvalidRequestError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def dtype_bytes(name: str) -> int:
    """Bytes per element of serving dtype ``name``; raises ``InvalidRequestError`` for one FlexPipe does not serve."""
    if name not in DTYPE_BYTES:
        raise InvalidRequestError(f"dtype {name!r} is not supported; use one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def kv_bytes_per_block(block_size: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of one layer's keys and values for ``block_size`` tokens."""
    return 2 * block_size * num_kv_heads * head_dim * dtype_bytes
