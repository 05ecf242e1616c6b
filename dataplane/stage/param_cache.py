"""A worker's host-memory cache of units it served before, so regaining them costs no disk read."""

from __future__ import annotations

from collections import OrderedDict

from dataplane.stage.unit_state import unit_bytes, with_pool


class ParamCache:
    """Built units (weights only, no KV pool) by unit name, least recently used evicted first.

    Invariant: the cached units' weight bytes never exceed ``budget_bytes``; a unit larger
    than the whole budget is not cached. ``get`` does not remove, so a prepared stage that
    is aborted leaves the cache as it was.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, budget_bytes)
        self._units: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self.used_bytes = 0

    def __contains__(self, name: str) -> bool:
        return name in self._units

    def names(self) -> list[str]:
        return list(self._units)

    def put(self, name: str, unit) -> bool:
        size = unit_bytes(unit)
        self.discard(name)
        if size > self.budget_bytes:
            return False
        while self.used_bytes + size > self.budget_bytes:
            _, (_, evicted) = self._units.popitem(last=False)
            self.used_bytes -= evicted
        self._units[name] = (with_pool(unit, None), size)
        self.used_bytes += size
        return True

    def get(self, name: str):
        if name not in self._units:
            return None
        self._units.move_to_end(name)
        return self._units[name][0]

    def discard(self, name: str) -> None:
        entry = self._units.pop(name, None)
        if entry is not None:
            self.used_bytes -= entry[1]
