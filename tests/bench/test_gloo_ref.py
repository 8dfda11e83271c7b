"""The gloo reference runs real processes, checks its result and leaves none behind."""
from __future__ import annotations

import psutil

from bench.gloo_ref import run_gloo


def _gloo_workers() -> set[int]:
    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "bench.gloo_ref" in p.cmdline():
                pids.add(p.pid)
        except psutil.Error:
            pass
    return pids


def test_all_reduce_two_ranks():
    records = run_gloo(2, [4096], ["all_reduce"], iters=3, warmup=1, timeout_s=60)
    assert len(records) == 1
    rec = records[0]
    assert (rec["op"], rec["bytes"], rec["count"], rec["world_size"], rec["backend"]) == \
        ("all_reduce", 4096, 1024, 2, "gloo")
    assert rec["error"] is None
    assert rec["wrong"] == 0
    assert rec["wall_us"] > 0
    assert rec["busbw_gbps"] == rec["algbw_gbps"]  # 2(n-1)/n = 1 at n = 2
    assert _gloo_workers() == set()
