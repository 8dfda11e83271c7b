"""rsd-launch topo: the card-to-card matrix as nvidia-smi topo -m prints it, JSON, and a drawing."""
import json

from rsd_runtime.cli import main


def run(capsys, *argv) -> str:
    assert main(["topo", *argv]) == 0
    return capsys.readouterr().out


def test_matrix_labels_and_legend(capsys):
    out = run(capsys, "--topology", "2s-2rp-split-flat").splitlines()
    assert out[0] == "rsd-runtime topology 2s-2rp-split-flat: 16 cards, card link pcie-gen4-x16"
    assert out[2].split() == [f"card{i}" for i in range(16)]
    # card 0: itself, its 7 box mates on Infinity Fabric, then box 1 by partition: same switch
    # (cards 8, 9), across the root complex (10, 11), across the sockets (12..15)
    assert out[3].split() == ["card0", "X", *["XGMI"] * 7, "PXB", "PXB", "PHB", "PHB", *["SYS"] * 4]
    assert out[3 + 10].split()[:3] == ["card10", "PHB", "PHB"]
    bw = out.index("Bottleneck bandwidth, GB/s per direction (one flow alone on the fabric):")
    assert out[bw + 3].split() == ["card0", "X", *["51.84"] * 7, "27.73", "27.73", *["14.11"] * 6]
    legend = out[out.index("Legend:") + 2:]
    assert [line.split()[0] for line in legend] == ["X", "XGMI", "PXB", "PHB", "SYS"]
    assert legend[0] == "  X    = self"
    assert "inter-socket link" in legend[-1]


def test_sized_presets_take_devices(capsys):
    out = run(capsys, "--topology", "switch-tree", "--devices", "6").splitlines()
    assert out[0] == "rsd-runtime topology switch-tree: 6 cards, card link pcie-gen5-x16"
    assert out[3].split() == ["card0", "X", "PIX", "PIX", "PIX", "PXB", "PXB"]
    assert [line.split()[0] for line in out[out.index("Legend:") + 2:]] == ["X", "PIX", "PXB"]
    # a fixed-size preset keeps its own count
    assert run(capsys, "--topology", "1s-1rp-std-cascade", "--devices", "4").startswith(
        "rsd-runtime topology 1s-1rp-std-cascade: 16 cards")


def test_json_and_png(capsys, tmp_path):
    png = tmp_path / "g.png"
    doc = json.loads(run(capsys, "--topology", "multi-node", "--devices", "4", "--link", "pcie-gen4-x16",
                         "--json", "--png", str(png)))
    assert doc["num_cards"] == 4 and doc["card_link"] == "pcie-gen4-x16"
    assert doc["labels"][0] == ["X", "PIX", "PIX", "PIX"]
    assert doc["bottleneck_gbps"][1][0] == 27.73 and doc["bottleneck_gbps"][1][1] is None
    assert doc["latency_ns"][0][1] == 700
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_topology_is_an_error(capsys):
    assert main(["topo", "--topology", "torus"]) == 2
    assert "unknown topology 'torus'" in capsys.readouterr().err
