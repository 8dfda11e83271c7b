"""Max-min fair rates by progressive filling, computed by hand."""
from fractions import Fraction

import pytest

from interconnect.topo_maxmin import max_min_rates
F = Fraction


def test_two_links_three_flows_textbook():
    # x: a, b; y: b, c; capacity 1 each -> both links full at 1/2 per flow
    assert max_min_rates({"a": ["x"], "b": ["x", "y"], "c": ["y"]}, {"x": 1, "y": 1}) == {
        "a": F(1, 2), "b": F(1, 2), "c": F(1, 2)}


def test_a_flow_held_elsewhere_leaves_the_rest():
    # L2 (4) fills first at 2 each, freezing f3 and f4; f1, f2 share what f3 leaves of L1: (10 - 2) / 2
    rates = max_min_rates({"f1": ["L1"], "f2": ["L1"], "f3": ["L1", "L2"], "f4": ["L2"]}, {"L1": 10, "L2": 4})
    assert rates == {"f1": 4, "f2": 4, "f3": 2, "f4": 2}


def test_weights_and_caps():
    # two flows each busy on x half of the time (weight 1/2): each may reach x's capacity, then its cap
    assert max_min_rates({"a": ["x"], "b": ["x"]}, {"x": 10}, weight={"x": F(1, 2)}) == {"a": 10, "b": 10}
    assert max_min_rates({"a": ["x"], "b": ["x"]}, {"x": 10}, weight={"x": F(1, 2)}, caps={"a": 4}) == {
        "a": 4, "b": 16}
    assert max_min_rates({"a": []}, {}, caps={"a": 3}) == {"a": 3}


def test_exact_thirds_and_order_independence():
    cap = F(1109, 20)  # 55.45 GB/s
    paths = {i: ["up"] for i in range(3)}
    assert max_min_rates(paths, {"up": cap}) == dict.fromkeys(range(3), F(1109, 60))
    forward = {"a": ["x", "y"], "b": ["y"], "c": ["x", "z"], "d": ["z"]}
    backward = dict(reversed(list(forward.items())))
    caps = {"x": 7, "y": 5, "z": 3}
    assert max_min_rates(forward, caps) == max_min_rates(backward, caps)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="no capacity"):
        max_min_rates({"a": ["x"]}, {})
    with pytest.raises(ValueError, match="unbounded"):
        max_min_rates({"a": []}, {})
    with pytest.raises(ValueError, match="must be positive"):
        max_min_rates({"a": ["x"]}, {"x": 0})
