"""A built unit's tensors, for moving it between workers or keeping it in host memory.

A unit (``Embed``, ``Attention``, ...) is a plain object whose weights are tensor
attributes, or tuples of tensors such as ``(weight, bias)``; its KV pool is the only
tensor it does not own. A receiver builds the same unit from the checkpoint's shapes on
the ``meta`` device, with no bytes read, and fills in the tensors it was sent.
"""

from __future__ import annotations

import copy

import torch

from common.errors import TransportError

KV_POOL_ATTRIBUTE = "kv_pool"


def unit_tensors(unit) -> dict[str, torch.Tensor]:
    """Every weight tensor of ``unit`` by attribute path (``qkv.0``), its KV pool excluded."""
    found = {}
    for name, value in vars(unit).items():
        if name == KV_POOL_ATTRIBUTE:
            continue
        if isinstance(value, torch.Tensor):
            found[name] = value
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    found[f"{name}.{i}"] = item
    return found


def unit_bytes(unit) -> int:
    return sum(t.numel() * t.element_size() for t in unit_tensors(unit).values())


def skeleton(adapter, unit_name: str, shapes: dict[str, list[int]], dtype: torch.dtype):
    """``unit_name`` built from meta tensors of the checkpoint's shapes: the right structure, no data."""
    tensors = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in shapes.items()}
    return adapter.build(unit_name, tensors, None)


def fill(unit, tensors: dict[str, torch.Tensor]):
    """Replace the weight tensors of ``unit`` (a skeleton) by ``tensors``; raises if any is missing or misshapen."""
    expected = unit_tensors(unit)
    if set(expected) != set(tensors):
        raise TransportError(f"unit weights carry {sorted(tensors)}, the unit needs {sorted(expected)}")
    for path, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[path].shape):
            raise TransportError(
                f"unit weight {path} has shape {list(tensor.shape)}, expected {list(expected[path].shape)}"
            )
    for name, value in list(vars(unit).items()):
        if isinstance(value, torch.Tensor) and name in tensors:
            setattr(unit, name, tensors[name])
        elif isinstance(value, (tuple, list)) and name != KV_POOL_ATTRIBUTE:
            items = [tensors.get(f"{name}.{i}", item) for i, item in enumerate(value)]
            setattr(unit, name, type(value)(items))
    return unit


def with_pool(unit, pool: torch.Tensor | None):
    """A shallow copy of ``unit`` reading and writing ``pool`` (the weights are shared)."""
    clone = copy.copy(unit)
    if hasattr(clone, KV_POOL_ATTRIBUTE):
        setattr(clone, KV_POOL_ATTRIBUTE, pool)
    return clone
