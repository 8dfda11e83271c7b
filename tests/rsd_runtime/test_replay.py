"""The replay's event loop on the emulated clock: idle jumps, the router hop, refused input."""
from __future__ import annotations

import pytest

from rsd_runtime.engine import LLMEngine
from rsd_runtime.replay import Replay, ReplayRequest
from rsd_runtime.routing import get_policy


def engines(k: int) -> list[LLMEngine]:
    return [LLMEngine("llama3-8b", 2, phantom=True, backend="sim", progress=False, max_num_seqs=4,
                      max_num_batched_tokens=64, chunk_size=64) for _ in range(k)]


def prompt(seed: int, n: int = 40) -> list[int]:
    return [(seed * 7919 + i * 31) % 1000 + 1 for i in range(n)]


def run(requests, k=2, policy="round-robin", hop_ns=0):
    es = engines(k)
    try:
        replay = Replay(es, get_policy(policy), router_hop_ns=hop_ns)
        return replay.run(requests), replay
    finally:
        for e in es:
            e.close()


def test_an_idle_instance_jumps_to_the_next_arrival():
    """A request that finds the rack idle takes the time it takes alone, however late it comes."""
    [alone], _ = run([ReplayRequest(0, prompt(1), 5)], k=1)
    late = 10 * alone.end_ns + 12_345
    [first, second], replay = run([ReplayRequest(0, prompt(1), 5), ReplayRequest(late, prompt(2), 5)], k=1)
    assert first.token_ns == alone.token_ns
    assert [t - late for t in second.token_ns] == alone.token_ns
    assert replay.steps == [10]  # each: one prefill step (its first token), then 4 decode steps


def test_the_router_hop_delays_every_token_by_exactly_the_hop():
    reqs = [ReplayRequest(i * 3_000_000, prompt(i), 4) for i in range(6)]
    base, _ = run(reqs)
    hop = 250_000
    hopped, _ = run(reqs, hop_ns=hop)
    for a, b in zip(base, hopped):
        assert (a.instance, a.arrival_ns) == (b.instance, b.arrival_ns)
        assert [t + hop for t in a.token_ns] == b.token_ns and a.end_ns + hop == b.end_ns


def test_requests_spread_by_policy_and_every_one_finishes():
    reqs = [ReplayRequest(0, prompt(i), 3) for i in range(8)]
    records, replay = run(reqs, k=2, policy="least-outstanding")
    assert [w.served for w in replay.workers] == [4, 4] and all(w.outstanding == 0 for w in replay.workers)
    assert all(r.finish_reason == "length" and r.output_len == 3 for r in records)


def test_a_negative_arrival_is_refused():
    with pytest.raises(ValueError, match="request 1: arrival time -5 ns is negative"):
        run([ReplayRequest(0, prompt(1), 2), ReplayRequest(-5, prompt(2), 2)], k=1)
