"""Routing policies as plain objects: what each decides from the workers' state and the request."""
from __future__ import annotations

import pytest

from rsd_runtime.routing import NoWorker, RouteRequest, WorkerState, get_policy
from rsd_runtime.routing.prefix_affinity import _Tree


def workers(n, **kw):
    return [WorkerState(f"w{i}", **kw) for i in range(n)]


def route(policy, ws, req):
    i = policy.choose(req, ws)
    policy.on_dispatch(req, ws[i])
    ws[i].outstanding += 1
    return i


def test_round_robin_takes_turns_and_skips_the_unhealthy():
    p, ws = get_policy("round-robin"), workers(3)
    assert [route(p, ws, RouteRequest()) for _ in range(4)] == [0, 1, 2, 0]
    ws[1].healthy = False
    assert [route(p, ws, RouteRequest()) for _ in range(3)] == [2, 0, 2]
    for w in ws:
        w.healthy = False
    with pytest.raises(NoWorker):
        p.choose(RouteRequest(), ws)


def test_least_outstanding_picks_the_least_busy_and_shares_ties_in_turn():
    p, ws = get_policy("least-outstanding"), workers(3)
    ws[0].outstanding, ws[1].outstanding, ws[2].outstanding = 5, 2, 2
    assert p.choose(RouteRequest(), ws) == 1
    assert p.choose(RouteRequest(), ws) == 2  # tie: the next one after the last chosen
    ws[2].outstanding = 9
    assert p.choose(RouteRequest(), ws) == 1


def test_session_pins_a_key_and_moves_only_the_keys_of_a_failed_worker():
    p, ws = get_policy("session"), workers(4)
    keys = [f"user{i}" for i in range(40)]
    first = {k: p.choose(RouteRequest(session=k), ws) for k in keys}
    assert all(p.choose(RouteRequest(session=k), ws) == first[k] for k in keys)
    assert len(set(first.values())) == 4  # spread over the workers
    ws[2].healthy = False
    moved = {k: p.choose(RouteRequest(session=k), ws) for k in keys}
    assert all(moved[k] == first[k] for k in keys if first[k] != 2)
    assert all(moved[k] != 2 for k in keys)
    assert [p.choose(RouteRequest(), ws) for _ in range(3)] == [0, 1, 3]  # no key: round-robin


def test_prefix_affinity_keeps_shared_prefixes_together_until_load_is_imbalanced():
    p, ws = get_policy("prefix-affinity", balance_abs_threshold=4), workers(3)
    system = list(range(100, 160))  # a shared 60-token system prompt
    a = route(p, ws, RouteRequest(tokens=system + [1, 2]))
    assert a == 0  # all trees empty: the smallest tree, then the first worker
    b = route(p, ws, RouteRequest(tokens=[7] * 50))  # nothing shared: the smallest tree
    assert b == 1
    for k in range(3):  # same prefix, more than half the prompt: back to worker 0
        assert route(p, ws, RouteRequest(tokens=system + [k])) == 0
    ws[0].outstanding = 10  # imbalanced: 10 - 0 > 4
    assert p.choose(RouteRequest(tokens=system + [9]), ws) == 2
    ws[0].outstanding = 1
    short = RouteRequest(tokens=system[:10] + list(range(500, 540)))  # 10 of 50 shared: below the threshold
    assert p.choose(short, ws) == 2  # worker 2's tree is the smallest


def test_prefix_tree_stays_within_its_bound_and_forgets_the_oldest_first():
    t = _Tree(max_nodes=10)
    t.insert((1, 2, 3, 4))
    t.insert((1, 2, 9))
    assert t.size == 5 and t.match((1, 2, 3, 4, 5)) == 4
    t.insert((7, 7, 7, 7, 7, 7))  # 11 nodes: the oldest prompt goes, the shared (1, 2) stays
    assert t.size == 9 and t.match((1, 2, 3)) == 2 and t.match((1, 2, 9)) == 3
    t.insert((1, 2))  # a prompt that ends inside another keeps its nodes when the longer one goes
    t.insert((8,) * 8)
    assert t.match((1, 2)) == 2 and t.size <= 10


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match="unknown routing policy 'random'; known: round-robin"):
        get_policy("random")
