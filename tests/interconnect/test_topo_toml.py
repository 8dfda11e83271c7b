"""Topologies written as TOML files: the same graph as the presets, and bad files refused by name."""
import textwrap

import pytest

from interconnect import topo_toml
from interconnect.topology import LinkId, UP, get_topology

MiB = 1 << 20

SWITCH = """
name = "my-switch"
edges = [["card0", "sw0"], ["card1", "sw0"], ["card2", "sw0"], ["sw0", "cpu0"]]
[nodes]
card0 = "card"
card1 = "card"
card2 = "card"
sw0 = "switch"
cpu0 = "cpu"
"""

# the example in interconnect.topo_toml's docstring, so that the documented format is the tested one
EXAMPLE = textwrap.dedent(topo_toml.__doc__.split("::\n")[1].split("\nKinds:")[0])


def write(tmp_path, text: str, name: str = "t.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_file_gives_the_preset_figures(tmp_path):
    mine = get_topology(write(tmp_path, SWITCH), 3)
    preset = get_topology("switch", 3)
    assert repr(mine) == "Topology('my-switch', num_cards=3, link='pcie-gen5-x16')"
    assert mine.path(0, 2) == preset.path(0, 2)
    for flows in ([(0, 1)], [(0, 1), (1, 2), (2, 0)], [(0, 2), (1, 2)]):
        assert mine.flow_bandwidth(flows) == preset.flow_bandwidth(flows)
        assert mine.transfer_time_ns(0, 1, 64 * MiB, flows) == preset.transfer_time_ns(0, 1, 64 * MiB, flows)


def test_the_documented_example(tmp_path):
    topo = get_topology(write(tmp_path, EXAMPLE), None)
    assert topo.name == "two-switches" and topo.num_cards == 4 and topo.link.name == "pcie-gen4-x16"
    assert topo.route(0, 1) == ["card0", "card1"]  # the direct fabric link
    assert topo.path(0, 1)[0].link == LinkId("card0-card1", UP)
    assert topo.bottleneck_gbps(0, 1) == 50.0
    assert topo.route(1, 0) == ["card1", "card0"]
    assert topo.route(1, 2) == ["card1", "sw0", "rp0", "cpu0", "rp1", "sw1", "card2"]
    assert topo.route(2, 3) == ["card2", "sw1", "card3"]
    assert [topo.relation(0, d) for d in range(4)] == ["X", "XGMI", "PHB", "PHB"]
    assert topo.relation(2, 3) == "PIX"
    # 350 + 115 + 150 + 150 + 115 + 350
    assert topo.latency_ns(1, 2) == 1230
    assert topo.bottleneck_gbps(1, 2) == 14.11


def test_a_socket_without_p2p_stages_at_host_memory(tmp_path):
    text = SWITCH.replace('cpu0 = "cpu"', 'cpu0 = { kind = "cpu", p2p = false, host_latency_ns = 200 }')
    text = text.replace('["card2", "sw0"], ', '').replace('card2 = "card"', 'card2 = "card"\n')
    text = text.replace('["sw0", "cpu0"]', '["sw0", "cpu0"], ["card2", "cpu0"]')
    topo = get_topology(write(tmp_path, text), 3)
    assert topo.route(0, 2) == ["card0", "sw0", "cpu0", "card2"]
    assert [len(s) for s in topo.stages(0, 2)] == [2, 1]
    # stage 1: 350 + 350 + 200 (into host memory); stage 2: 350 + 200 (out of it)
    assert topo.latency_ns(0, 2) == 1450
    assert topo.stages(0, 1) == [topo.path(0, 1)]  # turns in the switch: one cut-through stage


@pytest.mark.parametrize("change, message", [
    (('["sw0", "cpu0"]', '["sw0", "cpu0", "pcie-gen9"]'), r"edge sw0-cpu0: unknown link 'pcie-gen9'"),
    (('["card2", "sw0"], ', ""), "card card2 has no path to card card0"),
    (('["sw0", "cpu0"]', '["sw0", "cpu0"], ["sw0", "sw1"], ["sw1", "cpu0"]'), "PCIe loop"),
    (('["sw0", "cpu0"]', '["sw0", "cpu9"]'), "edge sw0-cpu9: unknown node 'cpu9'"),
    (('sw0 = "switch"', 'sw0 = "bridge"'), "node sw0: unknown kind 'bridge'"),
    (('cpu0 = "cpu"', 'cpu0 = { kind = "cpu", numa = 2 }'), "node cpu0: unknown option 'numa'"),
    (('["sw0", "cpu0"]', '["sw0", "cpu0"], ["cpu0", "sw0"]'), "edge cpu0-sw0 is listed twice"),
    (('name = "my-switch"', 'name = "my-switch"\nlinks = 3'), "links must be a table"),
    (('name = "my-switch"', 'nam = "x"'), r"unknown keys \['nam'\]"),
    (('[nodes]', '[nodes\n'), "not valid TOML"),
])
def test_bad_files_are_refused_naming_what_is_wrong(tmp_path, change, message):
    text = SWITCH.replace('sw0 = "switch"', 'sw0 = "switch"\nsw1 = "switch"')
    old, new = change
    assert old in text
    path = write(tmp_path, text.replace(old, new, 1))
    with pytest.raises(ValueError, match=message) as err:
        get_topology(path, None)
    assert path in str(err.value)


def test_the_loop_is_named_edge_by_edge(tmp_path):
    text = SWITCH.replace('sw0 = "switch"', 'sw0 = "switch"\nsw1 = "switch"\nsw2 = "switch"')
    text = text.replace('["sw0", "cpu0"]', '["sw0", "cpu0"], ["sw1", "sw0"], ["sw2", "sw1"], ["sw0", "sw2"]')
    with pytest.raises(ValueError, match="PCIe loop") as err:
        get_topology(write(tmp_path, text), None)
    loop = str(err.value).split("PCIe loop ")[1].split(":")[0].split(" - ")
    assert sorted(loop[:-1]) == ["sw0", "sw1", "sw2"] and loop[0] == loop[-1]


def test_card_count_options_and_missing_file(tmp_path):
    path = write(tmp_path, SWITCH)
    with pytest.raises(ValueError, match="has 3 cards, not 4"):
        get_topology(path, 4)
    with pytest.raises(ValueError, match="takes no options"):
        get_topology(path, 3, cards_per_leaf=2)
    with pytest.raises(ValueError, match="no topology file"):
        get_topology(str(tmp_path / "absent.toml"), 3)


def test_cards_joined_only_by_a_fabric(tmp_path):
    text = """
edges = [["card0", "card1", "infinity-fabric-mi300x"], ["card1", "card2", "infinity-fabric-mi300x"],
         ["card0", "card2", "infinity-fabric-mi300x"]]
[nodes]
card0 = "card"
card1 = "card"
card2 = "card"
"""
    topo = get_topology(write(tmp_path, text), 3)
    assert topo.relation(2, 0) == "XGMI" and topo.latency_ns(2, 0) == 700
    with pytest.raises(ValueError, match="card card1 has no path to card card2"):
        get_topology(write(tmp_path, text.replace(', ["card1", "card2", "infinity-fabric-mi300x"]', "")), 3)
