"""The resource graph: TOML inventories, links, incremental changes, the Alibaba trace."""

from pathlib import Path

import pytest

from common.topology import Device, ResourceGraph, TopologyError, graph_from_alibaba_trace, load_inventory

REPO = Path(__file__).resolve().parents[2]
ALIBABA_NODES = REPO / "tests" / "data" / "alibaba_gpu_v2023" / "openb_node_list_gpu_node.csv"


def test_the_example_inventory_loads_with_its_links():
    graph = load_inventory(REPO / "scripts" / "inventory.example.toml")
    assert sorted(graph.devices) == ["node-a-gpu0", "node-a-gpu1", "node-b-gpu0"]
    assert graph.devices["node-a-gpu0"].memory_free == 50 << 30 and graph.devices["node-a-gpu1"].memory_free == 80 << 30
    assert graph.link("node-a-gpu0", "node-a-gpu1").kind == "nvlink"
    assert graph.link("node-a-gpu0", "node-b-gpu0").kind == "network"
    assert graph.servers == {"node-a": ["node-a-gpu0", "node-a-gpu1"], "node-b": ["node-b-gpu0"]}


def inventory(tmp_path, devices: str) -> Path:
    path = tmp_path / "inv.toml"
    path.write_text('[[rack]]\nname = "r"\n[[rack.server]]\nname = "s"\n' + devices)
    return path


@pytest.mark.parametrize(
    "devices,message",
    [
        ('[[rack.server.device]]\nkind = "gpu"\nmemory = 1\n', "lacks the field 'id'"),
        ('[[rack.server.device]]\nid = "a"\n', "lacks the field 'memory'"),
        ('[[rack.server.device]]\nid = "a"\nmemory = -4\n', "negative"),
        ('[[rack.server.device]]\nid = "a"\nmemory = "lots"\n', "not a size"),
        (
            '[[rack.server.device]]\nid = "a"\nmemory = 1\n[[rack.server.device]]\nid = "a"\nmemory = 1\n',
            "duplicate device id",
        ),
        ('[[rack.server.device]]\nid = "a"\nmemory = 1\nnvlink = ["ghost"]\n', "NVLink peers"),
        ('[[rack.server.device]]\nid = "a"\nmemory = 1\nfree = 2\n', "free <= total"),
        ('[[rack.server.device]]\nid = "a"\nmemory = 1\nkind = "tpu"\n', "kind must be"),
    ],
)
def test_bad_inventories_say_what_is_wrong(tmp_path, devices, message):
    with pytest.raises(TopologyError, match=message):
        load_inventory(inventory(tmp_path, devices))


def test_unreadable_inventory(tmp_path):
    with pytest.raises(TopologyError, match="cannot read inventory"):
        load_inventory(tmp_path / "missing.toml")


def test_devices_come_and_go_and_a_readded_id_replaces_the_old_one():
    graph = ResourceGraph()
    graph.add_device(Device("d0", "cpu", "virtual", 100, 100, "s1", "r1"))
    graph.add_device(Device("d1", "cpu", "virtual", 100, 100, "s2", "r2"))
    assert graph.link("d0", "d1").kind == "cross_rack"
    graph.add_device(Device("d0", "cpu", "virtual", 50, 50, "s2", "r2"))
    assert graph.servers == {"s2": ["d1", "d0"]} and graph.racks == {"r2": ["s2"]}
    assert graph.link("d0", "d1").kind == "pcie"
    graph.remove_device("d1")
    graph.remove_device("d1")
    assert list(graph.devices) == ["d0"] and graph.servers == {"s2": ["d0"]}


def test_the_alibaba_gpu_cluster_becomes_a_graph():
    graph = graph_from_alibaba_trace(ALIBABA_NODES)
    assert len(graph.devices) == 6212 and len(graph.servers) > 1000
    any_node = next(iter(graph.servers.values()))
    if len(any_node) > 1:
        assert graph.link(any_node[0], any_node[1]).kind == "nvlink"
