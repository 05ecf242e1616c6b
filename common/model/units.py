"""Fine-grained units of a decoder-only model and the layouts built from them.

A model with L layers has 2L + 2 units, in execution order::

    embed, L0.attn, L0.mlp, L1.attn, L1.mlp, ..., head

Between any two consecutive units exactly one tensor (the residual stream) is
live, so a pipeline may be cut between any two units. The KV cache of layer i
belongs to ``L{i}.attn``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from common.errors import PartitionError

_UNIT_RE = re.compile(r"^(embed|head|L(\d+)\.(attn|mlp))$")


def unit_names(num_layers: int) -> list[str]:
    names = ["embed"]
    for i in range(num_layers):
        names += [f"L{i}.attn", f"L{i}.mlp"]
    names.append("head")
    return names


def unit_layer(name: str) -> int | None:
    """The layer index of an ``L{i}.*`` unit, None for embed/head."""
    match = _UNIT_RE.match(name)
    if match is None:
        raise PartitionError(f"unknown unit name {name!r}")
    return int(match.group(2)) if match.group(2) is not None else None


def is_layer_boundary(units: Sequence[str], cut: int) -> bool:
    """True when a cut before ``units[cut]`` does not split a layer's attn from its mlp."""
    return not units[cut].endswith(".mlp")


@dataclass(frozen=True, slots=True)
class Layout:
    """Contiguous stages over a model's units.

    Invariant: ``bounds`` are half-open unit index ranges that cover
    ``0..num_units`` in order, each non-empty.
    """

    bounds: tuple[tuple[int, int], ...]
    num_units: int

    def __post_init__(self) -> None:
        if not self.bounds:
            raise PartitionError("a layout needs at least one stage")
        expected_start = 0
        for start, end in self.bounds:
            if start != expected_start or end <= start:
                raise PartitionError(f"layout stages must be contiguous and non-empty: {self.bounds}")
            expected_start = end
        if expected_start != self.num_units:
            raise PartitionError(f"layout covers {expected_start} of {self.num_units} units")

    @property
    def num_stages(self) -> int:
        return len(self.bounds)

    def stage_units(self, stage: int, names: Sequence[str]) -> list[str]:
        start, end = self.bounds[stage]
        return list(names[start:end])

    def describe(self, names: Sequence[str]) -> list[str]:
        return [f"{names[s]}..{names[e - 1]}" for s, e in self.bounds]

    @classmethod
    def from_sizes(cls, sizes: Sequence[int], num_units: int) -> Layout:
        bounds, start = [], 0
        for size in sizes:
            bounds.append((start, start + int(size)))
            start += int(size)
        return cls(tuple(bounds), num_units)

    @classmethod
    def from_spec(cls, spec: Sequence, names: Sequence[str]) -> Layout:
        """Build a layout from unit counts ``[3, 4, 3]`` or inclusive name ranges ``[("embed", "L0.mlp"), ...]``."""
        if all(isinstance(item, int) for item in spec):
            return cls.from_sizes(spec, len(names))
        index = {name: i for i, name in enumerate(names)}
        bounds = []
        for item in spec:
            if isinstance(item, str):
                item = item.split("..") if ".." in item else (item, item)
            first, last = item
            if first not in index or last not in index:
                raise PartitionError(
                    f"unknown unit in layout range {first!r}..{last!r}; units are {names[0]}..{names[-1]}"
                )
            bounds.append((index[first], index[last] + 1))
        return cls(tuple(bounds), len(names))
