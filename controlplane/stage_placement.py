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
  ``AFFINITY_IDLE_DEVICE_WEIGHT``; servers that never hosted it, or not within ``AFFINITY_MAX_AGE_S``,
  get none.

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
is the cheapest of all candidates — the same candidates whatever the CV, so a higher CV never puts
more stages on shared devices. The search stops once ``deadline_s`` (counted from the call) is
spent and returns the cheapest found so far; if none was found by then, it makes one last
cluster-wide packed attempt. Free memory, shared devices and per-server and per-rack totals come
as arrays from ``controlplane.placement_view``, over a layout of the graph cached until it changes:
a 32-stage pipeline on 6,212 GPUs takes a few milliseconds.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from common.errors import FlexPipeError
from common.topology import ResourceGraph
from controlplane.placement_view import FreeView, layout_of

GAMMA0 = 1.0
ALPHA = 0.5
LINK_COST = {"nvlink": 0.0, "pcie": 0.1, "network": 1.0, "cross_rack": 2.0}

# The paper gives no values for Eq. 13. Weights load from a host-memory copy in seconds instead of
# tens of seconds from disk (OPT-66B: 47 s at 4 stages, paper Sec. 3), so a freshly warm server
# outweighs one shared device for a steady pipeline (gamma(0) = 1) but not two, nor, from CV = 1.1 on
# (gamma > 1.6), even one; and half the stages on it never pay for a network hop, which every
# micro-batch crosses while the cache saves one load (a hop costs 1.0, half the bonus 0.75).
AFFINITY_RECENCY_WEIGHT = 1.5  # w_t
# The host copy is kept about as long as an idle instance (the paper's 5-minute reclamation
# window): its affinity falls by e every 300 s.
AFFINITY_DECAY_PER_S = 1.0 / 300.0  # lambda, 1/s
# "Recently hosted" (Eq. 13): after six decay times (30 min, recency < 0.25 %) the copy counts as evicted.
AFFINITY_MAX_AGE_S = 1800.0
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
    hosted the model; ``deadline_s``: time bound in seconds of ``clock`` (None: none; the result
    then depends only on the inputs). Raises PlacementError with the reason when nothing fits.
    """
    if not stage_memory:
        return []
    stop_at = math.inf if deadline_s is None else clock() + deadline_s
    view = FreeView(layout_of(graph), reserved, exclude, shared or {}, tenants or {}, min(stage_memory))
    _check_feasible(stage_memory, view)
    affinity = _affinity(view, warm or {}, now)
    search = _Search(graph, view, stage_memory, gamma_of(cv), affinity, lambda: clock() >= stop_at)
    search.run()
    if search.best is None:
        cut = f" (search cut short by its {deadline_s * 1e3:g} ms time bound)" if search.cut else ""
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


def _check_feasible(stage_memory: list[int], view: FreeView) -> None:
    if len(stage_memory) > view.available:
        raise PlacementError(
            f"{len(stage_memory)} stages need {len(stage_memory)} distinct devices; only {view.available} are available"
        )
    for stage, need in enumerate(stage_memory):
        if need > view.largest:
            raise PlacementError(
                f"stage {stage} needs {gib(need)}; the largest free device fragment is {gib(view.largest)}"
            )


def _affinity(view: FreeView, warm: dict[str, float], now: float) -> dict[int, float]:
    """Eq. 13 per warm server (by server index): w_t * exp(-lambda * (now - t_s)) + w_g * (idle devices on s)."""
    scores = {}
    for server, hosted_at in warm.items():
        index = view.layout.server_index.get(server)
        if index is not None and now - hosted_at <= AFFINITY_MAX_AGE_S:
            recency = math.exp(-AFFINITY_DECAY_PER_S * max(0.0, now - hosted_at))
            idle = int(view.count_idle[index])
            scores[index] = AFFINITY_RECENCY_WEIGHT * recency + AFFINITY_IDLE_DEVICE_WEIGHT * idle
    return scores


class _Search:
    """Candidates in the order of the module docstring; ``best`` = (cost, device ids) or None.
    Servers are indices into ``view.layout.servers``; ``affinity`` maps a server index to its Eq. 13 score."""

    def __init__(self, graph: ResourceGraph, view: FreeView, stage_memory: list[int], gamma: float, affinity, expired):
        self.graph, self.view, self.stage_memory = graph, view, stage_memory
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
                self._consider(self._spread(self._roomiest(self.view.servers_with_room, PACKED), PACKED))

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

    def _devices(self, server: int, family: str) -> list[tuple[int, str]]:
        return self.view.devices(server, idle_only=family == ISOLATED, idle_first=family == IDLE_FIRST)

    # ---- one server -------------------------------------------------------------------------

    def _one_server_each(self) -> None:
        stages = len(self.stage_memory)
        count_all, count_idle = self.view.count_all.tolist(), self.view.count_idle.tolist()
        warm_first = sorted(self.affinity, key=lambda s: -self.affinity[s])
        others = np.flatnonzero(self.view.count_all >= stages).tolist()
        for server in warm_first + [s for s in others if s not in self.affinity]:
            bonus = self.affinity.get(server, 0.0)
            if count_all[server] < stages or not self._beats_best(-bonus):
                continue
            self._check_time()
            for family in FAMILIES:
                unavoidable = 0 if family == ISOLATED else max(0, stages - count_idle[server])
                if self._beats_best(self.gamma * unavoidable - bonus):
                    self._consider(self._best_fit(self._devices(server, family)))

    def _best_fit(self, unused: list[tuple[int, str]]) -> list[str] | None:
        """Largest stage first, each onto the first unused device that fits (the smallest, idle ones
        first in the idle-first family); None if a stage finds none."""
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
        view = self.view
        for rack in sorted(range(len(view.rack_room_all)), key=lambda r: -view.rack_room_all[r]):
            for family in FAMILIES:
                idle_only = family == ISOLATED
                count = view.rack_count_idle[rack] if idle_only else view.rack_count_all[rack]
                room = view.rack_room_idle[rack] if idle_only else view.rack_room_all[rack]
                most = view.rack_most_count_idle[rack] if idle_only else view.rack_most_count_all[rack]
                servers = view.layout.rack_servers[rack]
                bound = self._spread_lower_bound(family, count, room, most, view.rack_count_idle[rack], servers)
                if self._beats_best(bound):
                    self._spread_candidates(np.array(servers, dtype=np.int64), family)

    def _spread_over_cluster(self) -> None:
        view = self.view
        for family in FAMILIES:
            idle_only = family == ISOLATED
            count = view.count_idle if idle_only else view.count_all
            room = view.room_idle if idle_only else view.room_all
            idle = int(view.count_idle.sum())
            bound = self._spread_lower_bound(
                family, int(count.sum()), float(room.sum()), int(count.max(initial=0)), idle, self.affinity.keys()
            )
            if self._beats_best(bound):
                self._spread_candidates(view.servers_with_room, family)

    def _spread_lower_bound(self, family: str, devices: int, room: float, most_on_one: int, idle: int, servers):
        """No spread over these servers costs less: it crosses the network once per extra server it needs
        and puts what their idle devices cannot hold on shared ones. Infinite if the stages cannot fit."""
        stages = len(self.stage_memory)
        if devices < stages or room < sum(self.stage_memory):
            return math.inf
        hops = max(2, -(-stages // most_on_one)) - 1
        on_shared = 0 if family == ISOLATED else max(0, stages - idle)
        bonus = max((self.affinity[s] for s in servers if s in self.affinity), default=0.0) if self.affinity else 0.0
        return self.gamma * on_shared + LINK_COST["network"] * hops - bonus

    def _roomiest(self, servers: np.ndarray, family: str) -> list[int]:
        """``servers`` with devices the family may use, most free bytes first (idle bytes first when idle first)."""
        view = self.view
        if family == ISOLATED:
            order = np.argsort(-view.room_idle[servers], kind="stable")
        elif family == IDLE_FIRST:
            order = np.lexsort((-view.room_all[servers], -view.room_idle[servers]))
        else:
            order = np.argsort(-view.room_all[servers], kind="stable")
        ordered = servers[order]
        count = view.count_idle if family == ISOLATED else view.count_all
        return ordered[count[ordered] > 0].tolist()

    def _spread_candidates(self, servers: np.ndarray, family: str) -> None:
        roomiest = self._roomiest(servers, family)
        orders = [roomiest]
        warm = sorted((s for s in roomiest if s in self.affinity), key=lambda s: -self.affinity[s])
        if warm:
            orders.append(warm + [s for s in roomiest if s not in self.affinity])
        for order in orders:
            self._check_time()
            choice = self._spread(order, family)
            if choice is not None and len({self._server_of(d) for d in choice}) > 1:
                self._consider(choice)  # one server's candidates were tried already

    def _spread(self, servers: list[int], family: str) -> list[str] | None:
        """Stages in order, filling each server (first fitting device per stage) before the next."""
        choice: list[str] = []
        stages = len(self.stage_memory)
        for server in servers:
            unused = self._devices(server, family)
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

    def _server_of(self, device_id: str) -> int:
        return self.view.layout.server_of_list[self.view.layout.position[device_id]]

    def _cost(self, choice: list[str]) -> float:
        """gamma * (stages on shared devices) + link costs - mean affinity of the stages' servers (Eqs. 6-9, 13)."""
        position, shared = self.view.layout.position, self.view.shared
        on_shared = sum(1 for d in choice if shared[position[d]])
        links = sum(LINK_COST[self.graph.link(a, b).kind] for a, b in zip(choice, choice[1:]))
        bonus = sum(self.affinity.get(self._server_of(d), 0.0) for d in choice) / len(choice) if self.affinity else 0
        return self.gamma * on_shared + links - bonus


class _OutOfTime(Exception):
    """The search's time bound is spent."""
