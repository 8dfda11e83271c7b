"""The emulated clock of collectives follows the link model, exactly and repeatably."""
from __future__ import annotations

import subprocess
import sys

import pytest

from interconnect.links import get_link, transfer_ns
from interconnect.topology import get_topology
from rsd_runtime import Cluster

MiB = 1 << 20


def ring_all_reduce_predicted_ns(size: int, n: int, topology) -> int:
    """Alpha-beta: 2(n-1) steps, each one chunk of size/n over the slowest neighbour link."""
    step = max(topology.transfer_time_ns(i, (i + 1) % n, size // n, [(j, (j + 1) % n) for j in range(n)])
               for i in range(n))
    return 2 * (n - 1) * step


@pytest.fixture(scope="module")
def cluster(shm_prefix):
    with Cluster(num_devices=4, shm_prefix=shm_prefix) as c:
        yield c


def test_ring_all_reduce_busbw_matches_link_model(cluster):
    size, n = 64 * MiB, 4
    res = cluster.bench_collective("all_reduce", size // 4, "float32", algo="ring", warmup=0, iters=1)
    assert res["wrong"] == 0
    predicted = ring_all_reduce_predicted_ns(size, n, get_topology("switch", n, "pcie-gen5-x16"))
    busbw = size / res["emu_ns"] * 2 * (n - 1) / n  # GB/s: bytes per ns
    predicted_busbw = size / predicted * 2 * (n - 1) / n
    assert abs(busbw / predicted_busbw - 1) < 0.02, (busbw, predicted_busbw)
    # and that is close to the link's effective bandwidth, since the ring is bandwidth-optimal
    assert abs(predicted_busbw / get_link("pcie-gen5-x16").bandwidth_gbps - 1) < 0.01


def test_emulated_figures_repeat_exactly_under_host_load(cluster):
    first = [cluster.bench_collective("all_reduce", n, "float32", algo=a, warmup=0, iters=1)["emu_ns"]
             for a in ("ring", "tree", "one-shot") for n in (1024, 1 << 20)]
    hog = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<20: pass"])
    try:
        second = [cluster.bench_collective("all_reduce", n, "float32", algo=a, warmup=1, iters=1)["emu_ns"]
                  for a in ("ring", "tree", "one-shot") for n in (1024, 1 << 20)]
    finally:
        hog.kill()
        hog.wait()
    assert first == second


def test_small_messages_favour_tree_and_one_shot(cluster):
    emu = {a: cluster.bench_collective("all_reduce", 1024, "float32", algo=a, warmup=0, iters=1)["emu_ns"]
           for a in ("ring", "tree", "one-shot", "auto")}
    assert emu["tree"] < emu["ring"] and emu["one-shot"] < emu["ring"]
    assert emu["auto"] == min(emu.values())
    link = get_link("pcie-gen5-x16")
    # ring: 2(n-1) = 6 latency-bound steps of a 1 KiB chunk over card -> switch -> card (2 hops)
    assert emu["ring"] >= 6 * (2 * link.latency_ns + transfer_ns(link, 1024))


def test_host_staged_is_slower_by_the_predicted_factor(shm_prefix):
    size, n = 64 * MiB, 4
    emu = {}
    for topo in ("switch", "host-staged"):  # phantom: same emulated time, no bytes (tested below)
        with Cluster(num_devices=n, shm_prefix=shm_prefix, topology=topo, phantom=True) as c:
            emu[topo] = c.bench_collective("all_reduce", size // 4, "float32", algo="ring", warmup=0,
                                           iters=1)["emu_ns"]
    predicted = (ring_all_reduce_predicted_ns(size, n, get_topology("host-staged", n))
                 / ring_all_reduce_predicted_ns(size, n, get_topology("switch", n)))
    assert 1.9 < predicted < 2.1
    assert abs(emu["host-staged"] / emu["switch"] / predicted - 1) < 0.02


def test_phantom_cards_give_the_same_emulated_time(shm_prefix, cluster):
    real = cluster.bench_collective("all_reduce", 1 << 20, "float32", algo="ring", warmup=0, iters=1)
    with Cluster(num_devices=4, shm_prefix=shm_prefix, phantom=True) as c:
        ghost = c.bench_collective("all_reduce", 1 << 20, "float32", algo="ring", warmup=0, iters=1)
    assert ghost["emu_ns"] == real["emu_ns"] and ghost["wrong"] is None
