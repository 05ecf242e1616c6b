"""Where a pipeline's stages go: one device per stage on the resource graph (pure functions, no state).

``place`` scores candidate placements and keeps the cheapest (FlexPipe Eqs. 6-9 and 13):

    cost = gamma(CV) * (stages on shared devices) + sum of link costs between consecutive stages
           - mean over stages of the affinity of the stage's server

* a device is *shared* when other pipelines (``shared``) or other tenants' pods (``tenants``,
  from ``common.topology.fragment_with_pods``) already use it; gamma(CV) = gamma0 * (1 + alpha * CV^2)
  (Eq. 9), so bursty pipelines are isolated and steady ones may share;
* links: NVLink < PCIe < rack network < cross-rack (``LINK_COST``);
* affinity (Eq. 13), for servers that recently hosted the model (``warm``: server -> the time it
  last did, its host memory still caching the weights): w_t * exp(-lambda * (now - t_s)) + w_g *
  (idle devices on s), with w_t, lambda, w_g = ``AFFINITY_RECENCY_WEIGHT``, ``AFFINITY_DECAY_PER_S``,
  ``AFFINITY_IDLE_DEVICE_WEIGHT``; servers that never hosted it get none.

Candidates, most promising first, each in three families — *isolated* (only unshared devices),
*idle first* (unshared devices, then shared ones) and *packed* (every device, best fit) — so the
cost, not the search, decides between sharing and spreading:

1. one server each (warm servers first): stages take devices largest stage first, each the
   smallest device that still fits (best fit keeps big fragments for later pipelines and never
   misses a one-to-one fit that exists);
2. one rack each, then the whole cluster, unless a one-server candidate is already cheaper than
   any spread can be: stages in order fill the roomiest server, then the next (warm servers
   first in a second ordering), so consecutive stages share servers and cross the network rarely.

A candidate is skipped when a lower bound on its cost cannot beat the best so far, so the result
is the cheapest of all candidates. The search stops once ``deadline_s`` is spent and returns the
cheapest found so far; if none was found by then, it makes one last cluster-wide packed attempt.
Each server is visited a bounded number of times: 32 stages on 6,212 GPUs take milliseconds.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable

from common.errors import FlexPipeError
from common.topology import ResourceGraph

GAMMA0 = 1.0
ALPHA = 0.5
LINK_COST = {"nvlink": 0.0, "pcie": 0.1, "network": 1.0, "cross_rack": 2.0}

# The paper gives no values for Eq. 13. Weights load from a host-memory copy in seconds instead of
# tens of seconds from disk (OPT-66B: 47 s at 4 stages, paper Sec. 3), so a warm server outweighs two
# network hops or, at CV = 0 (gamma = 1), two shared devices; at CV >= 2 (gamma >= 3) isolation wins.
AFFINITY_RECENCY_WEIGHT = 2.0  # w_t
# The host copy is kept about as long as an idle instance (the paper's 5-minute reclamation
# window): its affinity falls by e every 300 s.
AFFINITY_DECAY_PER_S = 1.0 / 300.0  # lambda, 1/s
# Room to grow on the same server (Eq. 13's w_g term) only breaks ties between warm servers:
# eight idle GPUs add 0.8, less than the recency term.
AFFINITY_IDLE_DEVICE_WEIGHT = 0.1  # w_g, per idle device

# The policy decides in < 5 ms (paper Sec. 6) and a placement must answer well inside one control
# interval; 50 ms of search is ten times what a 32-stage pipeline on 6,212 GPUs normally needs on a
# small CPU, so the bound cuts the search only on an overloaded controller. None: no bound.
PLACEMENT_DEADLINE_S = 0.05

ISOLATED, IDLE_FIRST, PACKED = "isolated", "idle_first", "packed"
FAMILIES = (ISOLATED, IDLE_FIRST, PACKED)  # which devices a candidate may use, in which order


class PlacementError(FlexPipeError):
    """No placement satisfies memory and the one-stage-per-device rule; the message says why."""


def gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def gamma_of(cv: float) -> float:
    """The penalty per stage on a shared device, gamma(CV) = gamma0 * (1 + alpha * CV^2) (Eq. 9)."""
    return GAMMA0 * (1 + ALPHA * cv * cv)


def place(
    graph: ResourceGraph,
    stage_memory: list[int],
    reserved: dict[str, int],
    *,
    exclude: frozenset[str] | set[str] = frozenset(),
    shared: dict[str, int] | None = None,
    cv: float = 0.0,
    tenants: dict[str, int] | None = None,
    warm: dict[str, float] | None = None,
    now: float = 0.0,
    deadline_s: float | None = PLACEMENT_DEADLINE_S,
    clock: Callable[[], float] = time.perf_counter,
) -> list[str]:
    """Device ids for stages 0..K-1, the cheapest candidate found (see the module docstring).

    ``stage_memory[k]``: bytes stage k needs; ``reserved[d]``: bytes already promised on device d
    (subtracted from its ``memory_free``); ``exclude``: devices never to use; ``shared[d]`` /
    ``tenants[d]``: other pipelines / other tenants' pods on d; ``cv``: the pipeline's CV of
    inter-arrival times; ``warm[server]``: when (seconds, same clock as ``now``) that server last
    hosted the model; ``deadline_s``: search time bound in seconds of ``clock``.
    Raises PlacementError with the reason when nothing fits.
    """
    if not stage_memory:
        return []
    shared_devices = _shared_devices(shared, tenants)
    view = _FreeView.of(graph, reserved, exclude, shared_devices, min(stage_memory))
    _check_feasible(stage_memory, view)
    stop_at = math.inf if deadline_s is None else clock() + deadline_s
    affinity = _affinity(graph, view, warm or {}, now)
    search = _Search(graph, view, stage_memory, shared_devices, gamma_of(cv), affinity, lambda: clock() >= stop_at)
    search.run()
    if search.best is None:
        cut = " within the placement time bound" if search.cut else ""
        raise PlacementError(
            f"no assignment of {len(stage_memory)} stages needing "
            f"{', '.join(gib(m) for m in stage_memory)} fits the free device memory{cut}"
        )
    return search.best[1]


def place_pinned(
    graph: ResourceGraph, stage_memory: list[int], workers: list[str], reserved: dict[str, int]
) -> list[str]:
    """Check that stage k fits on ``workers[k]`` (distinct, known, with the free memory); returns ``workers``.
    Raises PlacementError naming the first stage that does not fit."""
    if len(set(workers)) != len(workers):
        raise PlacementError(f"stages must go to distinct devices, got {workers}")
    for stage, (device_id, need) in enumerate(zip(workers, stage_memory)):
        device = graph.devices.get(device_id)
        if device is None:
            raise PlacementError(f"stage {stage} is pinned to {device_id!r}, which is not an alive device")
        free = device.memory_free - reserved.get(device_id, 0)
        if need > free:
            raise PlacementError(f"stage {stage} needs {gib(need)}; {device_id} has {gib(free)} free")
    return list(workers)


def _shared_devices(shared: dict[str, int] | None, tenants: dict[str, int] | None) -> set[str]:
    return {d for counts in (shared or {}, tenants or {}) for d, n in counts.items() if n > 0}


@dataclass(slots=True)
class _Server:
    """One server's devices that can take the smallest stage: ``free[i]`` bytes on ``ids[i]``, smallest first."""

    name: str
    rack: str
    free: tuple[int, ...]
    ids: tuple[str, ...]
    capacity: int
    shared: set[str]
    _idle: tuple[int, int] | None = None

    def pairs(self, family: str) -> list[tuple[int, str]]:
        """(free bytes, device id) in the order the family tries them (each part smallest first)."""
        if family == PACKED:
            return list(zip(self.free, self.ids))
        idle = [(f, d) for f, d in zip(self.free, self.ids) if d not in self.shared]
        if family == ISOLATED:
            return idle
        return idle + [(f, d) for f, d in zip(self.free, self.ids) if d in self.shared]

    def count(self, family: str) -> int:
        return self.idle()[0] if family == ISOLATED else len(self.ids)

    def room(self, family: str) -> tuple[int, int]:
        """Sort key, larger is roomier: free bytes the family can use, unshared bytes first when idle first."""
        if family == ISOLATED:
            return (self.idle()[1], 0)
        return (self.idle()[1], self.capacity) if family == IDLE_FIRST else (self.capacity, 0)

    def idle(self) -> tuple[int, int]:
        """How many devices no one else uses, and their free bytes (computed once)."""
        if self._idle is None:
            free = [f for f, d in zip(self.free, self.ids) if d not in self.shared]
            self._idle = (len(free), sum(free))
        return self._idle


@dataclass(slots=True)
class _FreeView:
    """Free memory per device for one call: ``memory_free - reserved``, excluded devices gone.

    Built from the graph's cached ``sorted_free``; only servers with reserved or excluded devices
    are re-sorted. ``servers`` holds only devices that can take the smallest stage; ``available``
    and ``largest`` count every non-excluded device (for the error messages)."""

    servers: dict[str, _Server]
    available: int
    largest: int

    @classmethod
    def of(cls, graph: ResourceGraph, reserved: dict, exclude, shared: set[str], smallest_stage: int) -> _FreeView:
        touched = {d for d, n in reserved.items() if n} | set(exclude)
        touched_servers = {graph.devices[d].server for d in touched if d in graph.devices}
        servers: dict[str, _Server] = {}
        largest = 0
        for name, entry in graph.sorted_free().items():
            free, ids = entry.free, entry.device_ids
            if name in touched_servers:
                free, ids = _less_reserved(graph, ids, reserved, exclude)
            if not free:
                continue
            largest = max(largest, free[-1])
            start = bisect_left(free, smallest_stage)
            if start < len(free):
                usable = free[start:]
                servers[name] = _Server(name, entry.rack, usable, ids[start:], sum(usable), shared)
        available = len(graph.devices) - sum(1 for d in set(exclude) if d in graph.devices)
        return cls(servers, available, largest)


def _less_reserved(graph: ResourceGraph, ids, reserved: dict, exclude) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """A server's devices, excluded ones dropped, by ``memory_free - reserved``, smallest first."""
    pairs = sorted(
        ((graph.devices[d].memory_free - reserved.get(d, 0), d) for d in ids if d not in exclude), key=lambda p: p[0]
    )
    return tuple(f for f, _ in pairs), tuple(d for _, d in pairs)


def _check_feasible(stage_memory: list[int], view: _FreeView) -> None:
    if len(stage_memory) > view.available:
        raise PlacementError(
            f"{len(stage_memory)} stages need {len(stage_memory)} distinct devices; only {view.available} are available"
        )
    for stage, need in enumerate(stage_memory):
        if need > view.largest:
            raise PlacementError(
                f"stage {stage} needs {gib(need)}; the largest free device fragment is {gib(view.largest)}"
            )


def _affinity(graph: ResourceGraph, view: _FreeView, warm: dict[str, float], now: float) -> dict[str, float]:
    """Eq. 13 per warm server: w_t * exp(-lambda * (now - t_s)) + w_g * (idle devices on s)."""
    scores = {}
    for server, hosted_at in warm.items():
        if server in graph.servers:
            idle = view.servers[server].count(ISOLATED) if server in view.servers else 0
            recency = math.exp(-AFFINITY_DECAY_PER_S * max(0.0, now - hosted_at))
            scores[server] = AFFINITY_RECENCY_WEIGHT * recency + AFFINITY_IDLE_DEVICE_WEIGHT * idle
    return scores


class _Search:
    """Candidates in the order of the module docstring; ``best`` = (cost, device ids) or None."""

    def __init__(self, graph, view: _FreeView, stage_memory, shared: set[str], gamma: float, affinity, expired):
        self.graph, self.view, self.stage_memory, self.shared = graph, view, stage_memory, shared
        self.gamma, self.affinity, self.expired = gamma, affinity, expired
        self.largest_first = sorted(range(len(stage_memory)), key=lambda s: -stage_memory[s])
        self.best: tuple[float, list[str]] | None = None
        self.cut = False

    def run(self) -> None:
        try:
            self._one_server_each()
            self._spread_over_racks()
            self._spread_over_cluster()
        except _OutOfTime:
            self.cut = True
            if self.best is None:
                servers = sorted(self.view.servers.values(), key=lambda s: -s.capacity)
                self._consider(self._spread(servers, PACKED))

    def _beats_best(self, lower_bound: float) -> bool:
        return self.best is None or lower_bound < self.best[0]

    def _consider(self, choice: list[str] | None) -> None:
        if choice is not None:
            cost = self._cost(choice)
            if self._beats_best(cost):
                self.best = (cost, choice)

    def _check_time(self) -> None:
        if self.expired():
            raise _OutOfTime

    # ---- one server -------------------------------------------------------------------------

    def _one_server_each(self) -> None:
        stages = len(self.stage_memory)
        warm_first = sorted(self.affinity, key=lambda s: -self.affinity[s])
        servers = [self.view.servers[s] for s in warm_first if s in self.view.servers]
        servers += [s for s in self.view.servers.values() if s.name not in self.affinity]
        for server in servers:
            bonus = self.affinity.get(server.name, 0.0)
            if len(server.ids) < stages or not self._beats_best(-bonus):
                continue
            self._check_time()
            for family in FAMILIES:
                unavoidable = 0 if family == ISOLATED else max(0, stages - server.count(ISOLATED))
                if self._beats_best(self.gamma * unavoidable - bonus):
                    self._consider(self._best_fit(server.pairs(family)))

    def _best_fit(self, unused: list[tuple[int, str]]) -> list[str] | None:
        """Largest stage first, each onto the smallest unused device that fits; None if one finds none."""
        if len(unused) < len(self.stage_memory):
            return None
        choice = [""] * len(self.stage_memory)
        for stage in self.largest_first:
            need = self.stage_memory[stage]
            index = next((i for i, (free, _) in enumerate(unused) if free >= need), None)
            if index is None:
                return None
            choice[stage] = unused.pop(index)[1]
        return choice

    # ---- spreading ----------------------------------------------------------------------------

    def _spread_over_racks(self) -> None:
        by_rack: dict[str, list[_Server]] = {}
        for server in self.view.servers.values():
            by_rack.setdefault(server.rack, []).append(server)
        for servers in sorted(by_rack.values(), key=lambda servers: -sum(s.capacity for s in servers)):
            self._spread_candidates(servers)

    def _spread_over_cluster(self) -> None:
        self._spread_candidates(list(self.view.servers.values()))

    def _spread_candidates(self, servers: list[_Server]) -> None:
        for family in FAMILIES:
            if not self._beats_best(self._spread_lower_bound(servers, family)):
                continue
            roomiest = sorted(servers, key=lambda s: s.room(family), reverse=True)
            orders = [roomiest]
            warm = sorted((s for s in servers if s.name in self.affinity), key=lambda s: -self.affinity[s.name])
            if warm:
                orders.append(warm + [s for s in roomiest if s.name not in self.affinity])
            for order in orders:
                self._check_time()
                choice = self._spread(order, family)
                if choice is not None and len({self.graph.devices[d].server for d in choice}) > 1:
                    self._consider(choice)  # one server's candidates were tried already

    def _spread_lower_bound(self, servers: list[_Server], family: str) -> float:
        """No spread over ``servers`` costs less: it crosses the network once per extra server it needs,
        and puts what the idle devices cannot hold on shared ones. Infinite if none fits."""
        stages = len(self.stage_memory)
        devices = sum(s.count(family) for s in servers)
        room = sum(s.idle()[1] if family == ISOLATED else s.capacity for s in servers)
        if devices < stages or room < sum(self.stage_memory):
            return math.inf
        most_on_one = max(s.count(family) for s in servers)
        hops = max(2, -(-stages // most_on_one)) - 1
        on_shared = 0 if family == ISOLATED else max(0, stages - sum(s.count(ISOLATED) for s in servers))
        bonus = max((self.affinity.get(s.name, 0.0) for s in servers), default=0.0) if self.affinity else 0.0
        return self.gamma * on_shared + LINK_COST["network"] * hops - bonus

    def _spread(self, servers: list[_Server], family: str) -> list[str] | None:
        """Stages in order, filling each server (smallest fitting device per stage) before the next."""
        choice: list[str] = []
        stages = len(self.stage_memory)
        for server in servers:
            unused = server.pairs(family)
            while len(choice) < stages:
                need = self.stage_memory[len(choice)]
                index = next((i for i, (free, _) in enumerate(unused) if free >= need), None)
                if index is None:
                    break
                choice.append(unused.pop(index)[1])
            if len(choice) == stages:
                return choice
        return None

    # ---- cost ---------------------------------------------------------------------------------

    def _cost(self, choice: list[str]) -> float:
        devices = self.graph.devices
        shared = sum(1 for d in choice if d in self.shared)
        links = sum(LINK_COST[self.graph.link(a, b).kind] for a, b in zip(choice, choice[1:]))
        bonus = sum(self.affinity.get(devices[d].server, 0.0) for d in choice) / len(choice) if self.affinity else 0.0
        return self.gamma * shared + links - bonus


class _OutOfTime(Exception):
    """The search's time bound is spent."""
