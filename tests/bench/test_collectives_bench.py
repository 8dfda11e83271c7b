"""The collectives benchmark program runs end to end and writes the records it promises."""
from __future__ import annotations

import json

import pytest

from bench import collectives

KEYS = {"op", "algo", "world_size", "bytes", "wall_us", "wall_busbw_gbps", "emu_us", "emu_busbw_gbps", "wrong"}


def test_collectives_bench_writes_json(tmp_path, shm_prefix, capsys):
    out = tmp_path / "coll.json"
    rc = collectives.main(["--devices", "2", "--ops", "all_reduce", "broadcast", "--algos", "ring", "auto",
                           "-b", "4096", "-e", "65536", "-f", "16", "--iters", "1", "--warmup", "0",
                           "--json", str(out), "--shm-prefix", shm_prefix])
    assert rc == 0
    doc = json.loads(out.read_text())
    recs = doc["records"]
    assert len(recs) == 2 * 2 * 2 and all(KEYS <= set(r) for r in recs)
    assert all(r["wrong"] == 0 and r["emu_us"] > 0 and r["wall_us"] > 0 for r in recs)
    ring = [r for r in recs if r["op"] == "all_reduce" and r["algo"] == "ring"]
    assert ring[1]["emu_busbw_gbps"] > ring[0]["emu_busbw_gbps"]  # bandwidth grows with size
    text = capsys.readouterr().out
    assert "wall clock" in text and "emulated clock" in text and "#wrong" in text and "(GB/s)" in text
    assert text.count("# Avg bus bandwidth") == 4


def test_rings_replace_the_ring_algorithm():
    assert collectives.with_rings(["ring", "tree"], ["default", "search", "0 1|1 0"]) == \
        ["ring:default", "ring:search", "ring:0 1|1 0", "tree"]
    assert collectives.with_rings(["tree"], ["search"]) == ["tree", "ring:search"]
    with pytest.raises(ValueError, match="ring order '0 x': expected group ranks"):
        collectives.with_rings(["ring"], ["0 x"])


def test_phantom_cards_take_1_gib_calls_without_the_memory(shm_prefix):
    """Phantom cards touch no buffer: a 1 GiB all_gather costs them no 1 GiB, and gives the simulation's
    figure; a cluster smaller than a fixed-size preset runs on its first cards."""
    from interconnect import sim
    from interconnect.emulation import memory_reduce_ns
    from interconnect.topology import get_topology
    from devices.spec import get_spec
    from rsd_runtime.cluster import Cluster

    count, spec = 1 << 28, get_spec("gpu-mi300x")  # 1 GiB of float32 gathered
    with Cluster(num_devices=4, device="gpu-mi300x", phantom=True, topology="2s-2rp-split-flat",
                 shm_prefix=shm_prefix) as cluster:
        res = cluster.bench_collective("all_gather", count, algo="ring:search", warmup=1, iters=2)
        peak = [int(next(line.split()[1] for line in open(f"/proc/{p.pid}/status") if line.startswith("VmHWM")))
                for p in cluster.procs.values()]
    assert max(peak) < 512 << 10, peak  # kB: far below the 1 GiB output and its 256 MiB input
    topo = get_topology("2s-2rp-split-flat", None)
    call = sim.Call("all_gather", count // 4, "float32", "ring:search")
    want = sim.simulate(call, [0, 1, 2, 3], topo, memory_reduce_ns(spec.memory_bw, spec.memory_efficiency),
                        [(0, 0, 0)] * 4)
    assert res["emu_ns"] == max(c for c, _, _ in want)
