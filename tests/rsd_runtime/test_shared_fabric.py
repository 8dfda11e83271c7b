"""Instances stepped together on one fabric slow each other where their traffic meets, on both backends."""
from __future__ import annotations

import pytest

from rsd_runtime.perf import PerfRunner

TREE = dict(topology="switch-tree", topology_options={"cards_per_leaf": 4}, num_kv_blocks=64)
DECODE, PREFILL = [(1, 100)] * 8, [(512, 0)]


def steps(placement, backend="sim", **kw) -> tuple[int, int]:
    with PerfRunner("llama3-8b", tp=2, instances=len(placement), placement=placement, backend=backend,
                    **TREE, **kw) as r:
        return r.step(DECODE), r.step(PREFILL)


def test_two_instances_under_one_uplink_slow_each_other(shm_prefix):
    alone = steps([[0, 4]])
    across = steps([[0, 4], [1, 5]])  # both instances' all-reduces cross leaf 0's and leaf 1's uplinks
    assert across[0] > alone[0] and across[1] > alone[1]
    assert steps([[0, 1], [4, 5]]) == steps([[0, 1]])  # each on its own leaf: nothing shared
    # phantom card processes give the same figures: every card knows the other instance's cards
    assert steps([[0, 4], [1, 5]], backend="cards", shm_prefix=shm_prefix) == across


@pytest.mark.parametrize("placement,message", [([[0, 1]], "names 1 instances, not 2"),
                                               ([[0, 1], [1, 2]], "takes a card twice"),
                                               ([[0, 1], [2]], "instance 1 has 1 cards, not tp=2")])
def test_bad_placements_are_refused(placement, message):
    with pytest.raises(ValueError, match=message):
        PerfRunner("llama3-8b", tp=2, instances=2, placement=placement, **TREE)
