"""The topology study program: its tables, JSON and plot; searched rings never below the default."""
from __future__ import annotations

import json

from bench import inference, topology


def test_topology_bench_writes_tables_json_and_png(tmp_path, capsys):
    out, png = tmp_path / "topo.json", tmp_path / "topo.png"
    names = ["1s-2rp-std-cascade", "2s-2rp-split-flat"]
    assert topology.main(["--topologies", *names, "--sizes", str(16 << 20), "--json", str(out),
                          "--png", str(png)]) == 0
    recs = json.loads(out.read_text())["records"]
    assert len(recs) == 2 * 4 * 2  # topologies x ops x (default, searched)
    for name in names:
        for op in topology.OPS:
            d, s = (next(r["emu_busbw_gbps"] for r in recs if (r["topology"], r["op"], r["rings"]) == (name, op, k))
                    for k in ("default", "search"))
            assert s >= d
    flat = {r["op"]: r for r in recs if r["topology"] == "2s-2rp-split-flat" and r["rings"] == "search"}
    assert flat["all_reduce"]["channels"] == 4
    assert png.stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "busbw (GB/s, emulated clock), default rings" in text and "default against searched rings" in text
    assert all(name in text for name in names)


def test_one_box_instances_on_the_study_presets(tmp_path):
    """tp=8 on a 16-card preset takes the first box: the same figures whatever joins the boxes."""
    args = ["--model", "llama3-8b", "--device", "gpu-mi300x", "--input-len", "128", "--output-len", "8",
            "--no-scaling"]
    figures = {}
    for tp, name in [(8, "1s-1rp-std-cascade"), (8, "2s-2rp-std-flat"), (16, "1s-2rp-std-cascade"),
                     (16, "2s-2rp-split-flat")]:
        out = tmp_path / f"{tp}{name}.json"
        assert inference.main([*args, "--tp", str(tp), "--topology", name, "--json", str(out)]) == 0
        figures[tp, name] = json.loads(out.read_text())["records"][0]["emu_tpot_s"]
    assert figures[8, "1s-1rp-std-cascade"] == figures[8, "2s-2rp-std-flat"]
    # across the boxes, the split layout (searched rings turn in the switches) beats one shared uplink
    assert figures[16, "2s-2rp-split-flat"] < figures[16, "1s-2rp-std-cascade"]
