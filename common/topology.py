"""The hierarchical resource graph the allocator places stages on: cluster -> rack -> server -> device.

A TOML inventory describes it (``load_inventory``); worker registrations add to it
(``ResourceGraph.add_device``). Schema::

    [[rack]]
    name = "rack0"
      [[rack.server]]
      name = "node-a"
        [[rack.server.device]]
        id = "node-a-gpu0"          # unique; also the id of the worker serving it
        kind = "gpu"                # "gpu" or "cpu"
        name = "A100-80GB"
        memory = "80GiB"            # bytes, or a size with KiB/MiB/GiB/TiB
        free = "60GiB"              # optional; default: all of memory
        nvlink = ["node-a-gpu1"]    # optional NVLink peers on the same server

See ``scripts/inventory.example.toml``.
"""

from __future__ import annotations

import csv
from bisect import bisect_left, insort
from dataclasses import dataclass, field, replace
from pathlib import Path

import tomllib

from common.config import ConfigError, parse_bytes
from common.errors import FlexPipeError

NVLINK_BYTES_PER_S = 300e9
PCIE_BYTES_PER_S = 32e9
RACK_NETWORK_BYTES_PER_S = 12.5e9
CROSS_RACK_BYTES_PER_S = 6.25e9
LINK_SPEEDS = {
    "nvlink": NVLINK_BYTES_PER_S,
    "pcie": PCIE_BYTES_PER_S,
    "network": RACK_NETWORK_BYTES_PER_S,
    "cross_rack": CROSS_RACK_BYTES_PER_S,
}

# GPU memory per model where the Alibaba trace gives only the model name (public data sheets).
ALIBABA_GPU_MEMORY_GIB = {
    "P100": 16,
    "T4": 16,
    "V100": 16,
    "V100M16": 16,
    "V100M32": 32,
    "A10": 24,
    "G2": 24,
    "G3": 24,
    "A100": 80,
}


class TopologyError(FlexPipeError):
    """An inventory or a graph change is invalid."""


@dataclass
class Device:
    """One device. Invariant: ``0 <= memory_free <= memory_total``; ``nvlink`` peers are on ``server``."""

    device_id: str
    kind: str
    name: str
    memory_total: int
    memory_free: int
    server: str
    rack: str
    nvlink: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.memory_total < 0 or not 0 <= self.memory_free <= self.memory_total:
            raise TopologyError(
                f"device {self.device_id}: memory must satisfy 0 <= free <= total, "
                f"got free={self.memory_free} total={self.memory_total}"
            )
        if self.kind not in ("gpu", "cpu"):
            raise TopologyError(f"device {self.device_id}: kind must be 'gpu' or 'cpu', not {self.kind!r}")


@dataclass(frozen=True, slots=True)
class Link:
    kind: str
    bandwidth: float


@dataclass(frozen=True, slots=True)
class SortedFree:
    """One server's devices by free memory, smallest first: ``free[i]`` bytes free on ``device_ids[i]``."""

    rack: str
    free: tuple[int, ...]
    device_ids: tuple[str, ...]


@dataclass
class ResourceGraph:
    """Devices indexed by id and grouped by server and rack.

    Invariants: device ids are unique; ``servers[s]`` lists exactly the devices whose
    server is ``s`` and ``racks[r]`` exactly the servers in rack ``r``; adding a device
    with an existing id replaces it. ``version`` counts changes; change a device's memory
    by adding a new ``Device`` with its id (never by assigning to its fields), so that
    ``sorted_free`` sees it.
    """

    devices: dict[str, Device] = field(default_factory=dict)
    servers: dict[str, list[str]] = field(default_factory=dict)
    racks: dict[str, list[str]] = field(default_factory=dict)
    version: int = field(default=0, compare=False)
    _sorted_free: tuple[int, dict[str, SortedFree]] | None = field(default=None, repr=False, compare=False)

    def sorted_free(self) -> dict[str, SortedFree]:
        """Per server, its devices by ``memory_free``, smallest first; built once per ``version``."""
        if self._sorted_free is None or self._sorted_free[0] != self.version:
            index = {}
            for server, members in self.servers.items():
                ordered = sorted(members, key=lambda d: self.devices[d].memory_free)  # stable: ties keep their order
                free = tuple(self.devices[d].memory_free for d in ordered)
                index[server] = SortedFree(self.devices[members[0]].rack, free, tuple(ordered))
            self._sorted_free = (self.version, index)
        return self._sorted_free[1]

    def add_device(self, device: Device) -> None:
        self.version += 1
        if device.device_id in self.devices:
            self.remove_device(device.device_id)
        self.devices[device.device_id] = device
        members = self.servers.setdefault(device.server, [])
        members.append(device.device_id)
        if device.server not in self.racks.setdefault(device.rack, []):
            self.racks[device.rack].append(device.server)

    def remove_device(self, device_id: str) -> None:
        device = self.devices.pop(device_id, None)
        if device is None:
            return
        self.version += 1
        self.servers[device.server].remove(device_id)
        if not self.servers[device.server]:
            del self.servers[device.server]
            self.racks[device.rack].remove(device.server)
            if not self.racks[device.rack]:
                del self.racks[device.rack]

    def link(self, a: str, b: str) -> Link:
        """The link between two devices: NVLink, PCIe (same server), network (same rack) or cross-rack."""
        first, second = self.devices[a], self.devices[b]
        if first.server == second.server:
            kind = "nvlink" if b in first.nvlink or a in second.nvlink else "pcie"
        else:
            kind = "network" if first.rack == second.rack else "cross_rack"
        return Link(kind, LINK_SPEEDS[kind])


def load_inventory(path: str | Path) -> ResourceGraph:
    """The graph a TOML inventory describes; raises TopologyError saying what is wrong."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TopologyError(f"cannot read inventory {path}: {exc}") from None
    graph = ResourceGraph()
    for rack in _entries(raw, "rack", "inventory"):
        rack_name = _field(rack, "name", "rack")
        for server in _entries(rack, "server", f"rack {rack_name}"):
            server_name = _field(server, "name", f"server in rack {rack_name}")
            for entry in _entries(server, "device", f"server {server_name}"):
                device_id = _field(entry, "id", f"device on server {server_name}")
                if device_id in graph.devices:
                    raise TopologyError(f"duplicate device id {device_id!r} in {path}")
                try:
                    total = parse_bytes(_field(entry, "memory", f"device {device_id}"))
                    free = parse_bytes(entry.get("free", total))
                except ConfigError as exc:
                    raise TopologyError(f"device {device_id}: {exc}") from None
                graph.add_device(
                    Device(
                        device_id,
                        entry.get("kind", "gpu"),
                        entry.get("name", ""),
                        total,
                        free,
                        server_name,
                        rack_name,
                        frozenset(entry.get("nvlink", [])),
                    )
                )
    for device in graph.devices.values():
        strangers = [p for p in device.nvlink if p not in graph.devices or graph.devices[p].server != device.server]
        if strangers:
            raise TopologyError(
                f"device {device.device_id}: NVLink peers {strangers} are not devices on server {device.server}"
            )
    return graph


def _entries(table: dict, key: str, where: str) -> list[dict]:
    entries = table.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise TopologyError(f"{where}: '{key}' must be an array of tables ([[...{key}]])")
    return entries


def _field(table: dict, key: str, where: str):
    if key not in table:
        raise TopologyError(f"{where} lacks the field '{key}'")
    return table[key]


def graph_from_alibaba_trace(node_csv: str | Path, racks_of: int = 32) -> ResourceGraph:
    """A graph with one server per GPU node of the Alibaba GPU cluster trace 2023
    (``openb_node_list_gpu_node.csv``); GPU memory from the model name (``ALIBABA_GPU_MEMORY_GIB``,
    16 GiB when unknown); ``racks_of`` consecutive nodes share a rack, GPUs of a node share NVLink."""
    graph = ResourceGraph()
    with open(node_csv, newline="") as f:
        for index, row in enumerate(csv.DictReader(f)):
            gpus = int(row["gpu"])
            memory = ALIBABA_GPU_MEMORY_GIB.get(row["model"], 16) << 30
            ids = [f"{row['sn']}-gpu{g}" for g in range(gpus)]
            for device_id in ids:
                graph.add_device(
                    Device(
                        device_id,
                        "gpu",
                        row["model"],
                        memory,
                        memory,
                        row["sn"],
                        f"rack{index // racks_of}",
                        frozenset(set(ids) - {device_id}),
                    )
                )
    return graph


@dataclass
class FragmentedCluster:
    """A graph after other tenants' pods took their GPU shares (``fragment_with_pods``).

    ``tenants[d]``: pods on device ``d`` (devices without pods are absent) — the allocator counts
    these devices as shared (FlexPipe Eq. 9); ``pod_devices[name]``: the devices a placed pod took;
    ``milli_taken[d]``: thousandths of ``d`` taken; ``pods_unfit``: pods alive at the time that fit
    on no GPU (counted, not placed).
    """

    graph: ResourceGraph
    tenants: dict[str, int]
    pod_devices: dict[str, list[str]]
    milli_taken: dict[str, int]
    pods_unfit: int

    @property
    def pods_placed(self) -> int:
        return len(self.pod_devices)


def fragment_with_pods(
    graph: ResourceGraph, pod_csv: str | Path, at_time: float | None = None, fit: str = "best"
) -> FragmentedCluster:
    """A copy of ``graph`` whose GPUs hold the pods of an Alibaba pod list (``openb_pod_list_*.csv``).

    Pods alive at ``at_time`` (seconds of the trace: scheduled, and creation_time <= t < deletion_time),
    or every pod in phase Running when ``at_time`` is None, are placed in order of creation, as a
    cluster scheduler would have placed them (the trace has no pod -> node column):

    * ``gpu_milli == 1000`` (whole GPUs): ``num_gpu`` distinct, untouched GPUs of one node; best fit
      takes the node with the fewest untouched GPUs that still has enough, first fit the first such
      node in graph order;
    * ``gpu_milli < 1000`` (a share, ``num_gpu == 1``): one GPU with at least that many thousandths
      left; best fit takes the GPU with the least left over, first fit the first in graph order.

    Assumptions: a pod's share of GPU memory equals its share of the GPU (``gpu_milli / 1000`` of
    ``memory_total``, rounded up); a GPU starts with ``floor(1000 * memory_free / memory_total)``
    thousandths; ``gpu_spec`` (GPU-type constraints; empty in the default list) is ignored; pods
    without GPUs (``num_gpu == 0``) take nothing; CPU devices are never used. Pods that fit nowhere
    are counted in ``pods_unfit``. Raises TopologyError for an unknown ``fit`` or an unreadable list.
    """
    if fit not in ("best", "first"):
        raise TopologyError(f"fit must be 'best' or 'first', not {fit!r}")
    gpus = [d for d in graph.devices.values() if d.kind == "gpu"]
    packer = _PodPacker(gpus, best_fit=fit == "best")
    pod_devices: dict[str, list[str]] = {}
    unfit = 0
    for name, num_gpu, milli in _alive_gpu_pods(pod_csv, at_time):
        taken = packer.place(num_gpu, milli)
        if taken is None:
            unfit += 1
        else:
            pod_devices[name] = [gpus[i].device_id for i in taken]
    return _apply_pods(graph, gpus, packer, pod_devices, unfit)


def _alive_gpu_pods(pod_csv: str | Path, at_time: float | None) -> list[tuple[str, int, int]]:
    """(name, num_gpu, gpu_milli) of the pods holding GPUs at ``at_time``, in order of creation."""
    try:
        with open(pod_csv, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise TopologyError(f"cannot read pod list {pod_csv}: {exc}") from None
    alive = []
    for row in rows:
        num_gpu, milli = int(row["num_gpu"] or 0), int(row["gpu_milli"] or 0)
        if num_gpu == 0 or milli == 0:
            continue
        if at_time is None:
            is_alive = row["pod_phase"] == "Running"
        else:
            scheduled = row["scheduled_time"] != "" and float(row["scheduled_time"]) <= at_time
            is_alive = scheduled and float(row["creation_time"]) <= at_time < float(row["deletion_time"])
        if is_alive:
            alive.append((float(row["creation_time"]), row["name"], num_gpu, milli))
    return [(name, num_gpu, milli) for _, name, num_gpu, milli in sorted(alive)]


def _apply_pods(
    graph: ResourceGraph, gpus: list[Device], packer: _PodPacker, pod_devices: dict[str, list[str]], unfit: int
) -> FragmentedCluster:
    """The copied graph with each GPU's memory lowered by the thousandths its pods took."""
    taken = {gpus[i].device_id: t for i, t in enumerate(packer.milli_taken) if t}
    tenants: dict[str, int] = {}
    for devices in pod_devices.values():
        for device_id in devices:
            tenants[device_id] = tenants.get(device_id, 0) + 1
    fragmented = ResourceGraph()
    for device in graph.devices.values():
        share = -(-device.memory_total * taken.get(device.device_id, 0) // 1000)
        fragmented.add_device(replace(device, memory_free=max(0, device.memory_free - share)))
    return FragmentedCluster(fragmented, tenants, pod_devices, taken, unfit)


class _PodPacker:
    """First- or best-fit of pods onto GPUs ``0..n-1``; GPUs of one server form a node."""

    def __init__(self, gpus: list[Device], best_fit: bool) -> None:
        self.best_fit = best_fit
        self.milli_left = [1000 * d.memory_free // d.memory_total if d.memory_total else 0 for d in gpus]
        self.milli_taken = [0] * len(gpus)
        node_index: dict[str, int] = {}
        self.node_of = [node_index.setdefault(d.server, len(node_index)) for d in gpus]
        self.node_gpus: list[list[int]] = [[] for _ in node_index]
        for gpu, node in enumerate(self.node_of):
            self.node_gpus[node].append(gpu)
        self.by_milli_left = _Buckets()
        for gpu, left in enumerate(self.milli_left):
            self.by_milli_left.add(left, gpu)
        self.by_whole_free = _Buckets()
        for node, members in enumerate(self.node_gpus):
            self.by_whole_free.add(sum(1 for g in members if self.milli_left[g] == 1000), node)

    def place(self, num_gpu: int, milli: int) -> list[int] | None:
        """The GPUs a pod takes (and takes them), or None when it fits nowhere."""
        if milli >= 1000:
            node = self.by_whole_free.pick(num_gpu, self.best_fit)
            if node is None:
                return None
            chosen = [g for g in self.node_gpus[node] if self.milli_left[g] == 1000][:num_gpu]
        else:
            if num_gpu != 1:
                return None
            gpu = self.by_milli_left.pick(milli, self.best_fit)
            if gpu is None:
                return None
            chosen = [gpu]
        for gpu in chosen:
            self._take(gpu, min(milli, 1000))
        return chosen

    def _take(self, gpu: int, milli: int) -> None:
        before = self.milli_left[gpu]
        self.milli_left[gpu] = before - milli
        self.milli_taken[gpu] += milli
        self.by_milli_left.move(gpu, before, before - milli)
        if before == 1000:
            node = self.node_of[gpu]
            whole = sum(1 for g in self.node_gpus[node] if self.milli_left[g] == 1000)
            self.by_whole_free.move(node, whole + 1, whole)


class _Buckets:
    """Indices grouped by an integer key (thousandths left on a GPU, untouched GPUs of a node),
    each group kept in index order, so best and first fit need no scan over all indices."""

    def __init__(self) -> None:
        self.groups: dict[int, list[int]] = {}

    def add(self, key: int, index: int) -> None:
        insort(self.groups.setdefault(key, []), index)

    def move(self, index: int, old: int, new: int) -> None:
        group = self.groups[old]
        del group[bisect_left(group, index)]
        if not group:
            del self.groups[old]
        self.add(new, index)

    def pick(self, need: int, best_fit: bool) -> int | None:
        """Best fit: the first index of the smallest key >= need; first fit: the smallest such index."""
        keys = [k for k in self.groups if k >= need]
        if not keys:
            return None
        if best_fit:
            return self.groups[min(keys)][0]
        return min(self.groups[k][0] for k in keys)
