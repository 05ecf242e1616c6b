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
from dataclasses import dataclass, field
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


@dataclass
class ResourceGraph:
    """Devices indexed by id and grouped by server and rack.

    Invariants: device ids are unique; ``servers[s]`` lists exactly the devices whose
    server is ``s`` and ``racks[r]`` exactly the servers in rack ``r``; adding a device
    with an existing id replaces it.
    """

    devices: dict[str, Device] = field(default_factory=dict)
    servers: dict[str, list[str]] = field(default_factory=dict)
    racks: dict[str, list[str]] = field(default_factory=dict)

    def add_device(self, device: Device) -> None:
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
