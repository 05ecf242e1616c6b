"""What one placement call sees of the resource graph, as arrays: free memory per device after
reservations, which devices are shared, and per-server and per-rack totals.

The graph's devices are laid out once per graph version (``Layout``, from
``ResourceGraph.sorted_free``, cached); each call (``FreeView``) only subtracts its reservations
and marks its exclusions and shared devices, in O(devices) numpy work plus O(entries) to look up
the ids in ``reserved``, ``exclude``, ``shared`` and ``tenants`` — no Python loop over 6,212 devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.topology import ResourceGraph


@dataclass(frozen=True, eq=False)
class Layout:
    """The graph's devices as flat arrays, grouped by server (graph order), within a server by base free.

    Server ``s`` (``servers[s]``) holds devices ``starts[s]:starts[s + 1]`` of ``ids``; ``base_free``
    is bytes per device; ``server_of`` a server index per device; ``rack_of`` a rack index per server.
    ``source`` is the ``sorted_free()`` mapping it was built from (its identity is the cache key).
    """

    source: dict
    ids: list[str]
    position: dict[str, int]
    base_free: np.ndarray
    server_of: np.ndarray
    server_of_list: list[int]
    starts: list[int]
    servers: list[str]
    server_index: dict[str, int]
    rack_of: np.ndarray
    rack_servers: list[list[int]]


_cached: list[Layout] = []


def layout_of(graph: ResourceGraph) -> Layout:
    """The graph's layout, rebuilt only when the graph changed (``ResourceGraph.version``)."""
    source = graph.sorted_free()
    if _cached and _cached[0].source is source:
        return _cached[0]
    ids: list[str] = []
    free: list[int] = []
    server_of: list[int] = []
    starts = [0]
    rack_index: dict[str, int] = {}
    rack_of: list[int] = []
    for s, entry in enumerate(source.values()):
        ids.extend(entry.device_ids)
        free.extend(entry.free)
        server_of.extend([s] * len(entry.device_ids))
        starts.append(len(ids))
        rack_of.append(rack_index.setdefault(entry.rack, len(rack_index)))
    rack_servers: list[list[int]] = [[] for _ in rack_index]
    for s, rack in enumerate(rack_of):
        rack_servers[rack].append(s)
    servers = list(source)
    layout = Layout(
        source,
        ids,
        {d: i for i, d in enumerate(ids)},
        np.array(free, dtype=np.int64),
        np.array(server_of, dtype=np.int64),
        server_of,
        starts,
        servers,
        {name: s for s, name in enumerate(servers)},
        np.array(rack_of, dtype=np.int64),
        rack_servers,
    )
    _cached[:] = [layout]
    return layout


class FreeView:
    """Free bytes per device for one call (``memory_free - reserved``), and per-server/per-rack totals.

    A device is *usable* when not excluded and it can take the smallest stage; *idle* when usable
    and not shared. ``count_all[s]`` / ``room_all[s]``: usable devices on server s and their free
    bytes; ``count_idle`` / ``room_idle`` the same for idle devices (numpy arrays by server index);
    ``rack_*``: the same summed per rack, ``rack_most_count_*``: the most on one server of the rack
    (lists by rack index); ``servers_with_room``: servers with a usable device. ``free``, ``usable``,
    ``shared``: lists by device index. ``available``, ``largest``: non-excluded devices and the most
    free bytes on one (for the error messages).
    """

    def __init__(
        self,
        layout: Layout,
        reserved: dict[str, int],
        exclude,
        shared_counts: dict[str, int],
        tenants: dict[str, int],
        smallest_stage: int,
    ) -> None:
        self.layout = layout
        position = layout.position
        free = layout.base_free.copy()
        if reserved:  # arrays, not a list of (index, bytes) tuples: thousands of live tuples would wake the full GC
            index = np.fromiter((position.get(d, -1) for d in reserved), dtype=np.int64, count=len(reserved))
            amount = np.fromiter(reserved.values(), dtype=np.int64, count=len(reserved))
            known = index >= 0
            free[index[known]] -= amount[known]
        alive = np.ones(len(layout.ids), dtype=bool)
        alive[[position[d] for d in exclude if d in position]] = False
        shared = np.zeros(len(layout.ids), dtype=bool)
        for counts in (shared_counts, tenants):
            shared[[position[d] for d, n in counts.items() if n > 0 and d in position]] = True
        usable = alive & (free >= smallest_stage)
        idle = usable & ~shared
        self.available = int(alive.sum())
        self.largest = int(free[alive].max()) if self.available else 0
        self.free, self.usable, self.shared = free.tolist(), usable.tolist(), shared.tolist()
        totals = [self._per_server(mask, free) for mask in (usable, idle)]
        (self.count_all, self.room_all), (self.count_idle, self.room_idle) = totals
        self._rack_totals()

    def _per_server(self, mask: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        servers = len(self.layout.servers)
        count = np.bincount(self.layout.server_of, weights=mask, minlength=servers).astype(np.int64)
        room = np.bincount(self.layout.server_of, weights=np.where(mask, free, 0), minlength=servers)
        return count, room

    def _rack_totals(self) -> None:
        rack_of, racks = self.layout.rack_of, len(self.layout.rack_servers)

        def summed(per_server: np.ndarray) -> list[float]:
            return np.bincount(rack_of, weights=per_server, minlength=racks).tolist()

        def most(per_server: np.ndarray) -> list[int]:
            top = np.zeros(racks, dtype=np.int64)
            np.maximum.at(top, rack_of, per_server)
            return top.tolist()

        self.rack_count_all, self.rack_room_all = summed(self.count_all), summed(self.room_all)
        self.rack_count_idle, self.rack_room_idle = summed(self.count_idle), summed(self.room_idle)
        self.rack_most_count_all, self.rack_most_count_idle = most(self.count_all), most(self.count_idle)
        self.servers_with_room = np.flatnonzero(self.count_all > 0)

    def devices(self, server: int, idle_only: bool, idle_first: bool) -> list[tuple[int, str]]:
        """(free bytes, device id) of a server's usable devices, smallest first (idle ones first when
        ``idle_first``; only idle ones when ``idle_only``)."""
        ids, free, usable, shared = self.layout.ids, self.free, self.usable, self.shared
        start, stop = self.layout.starts[server], self.layout.starts[server + 1]
        found = [
            (shared[i], free[i], ids[i]) for i in range(start, stop) if usable[i] and not (idle_only and shared[i])
        ]
        found.sort(key=(lambda d: (d[0], d[1])) if idle_first else (lambda d: d[1]))
        return [(f, d) for _, f, d in found]
