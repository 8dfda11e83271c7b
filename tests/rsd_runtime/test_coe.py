"""The expert pool: switch times against hand figures, LRU eviction, capacity errors per tier."""
from __future__ import annotations

import dataclasses

import pytest

from devices.spec import GiB, get_spec
from devices.tiers import OutOfTierMemory
from rsd_runtime.coe import ExpertPool, switch_path
from rsd_runtime.deploy import shard_bytes
from rsd_runtime.model_config import get_model_preset

SN40L = get_spec("sn40l")
ATOM = get_spec("atom-plus")


def test_ddr_switch_time_by_hand():
    path = switch_path(SN40L)
    assert path.source == "ddr"
    # 1 GiB at 100 GB/s (1 GB/s = 1 byte/ns): ceil(1073741824 / 100) = 10737419 ns, whatever the card count
    assert path.copy_ns(GiB) == 10_737_419
    assert switch_path(SN40L, num_cards=8).copy_ns(GiB) == 10_737_419


def test_host_switch_time_by_hand_with_a_shared_uplink():
    # No DDR tier: host memory over PCIe Gen5 x16 (55.45 GB/s, 350 ns a hop), through one switch
    # (two hops), after the root complex's 500 ns DRAM read.
    alone = switch_path(ATOM)
    assert alone.source == "host"
    assert alone.copy_ns(10**9) == 500 + 2 * 350 + 18_034_266  # ceil(1e9 / 55.45)
    # Two cards under one switch share its uplink: each gets half of it.
    assert switch_path(ATOM, num_cards=2).copy_ns(10**9) == 500 + 2 * 350 + 36_068_531  # ceil(2e9 / 55.45)
    # Each card on its own root port (host-staged): one hop, no sharing.
    own = switch_path(ATOM, num_cards=4, topology="host-staged")
    assert own.copy_ns(10**9) == 500 + 350 + 18_034_266
    assert switch_path(SN40L, "host").copy_ns(10**9) == alone.copy_ns(10**9)


def test_llama2_7b_expert_on_eight_sn40l_sockets():
    cfg = get_model_preset("llama2-7b")
    per_socket = shard_bytes(cfg, 8, 2)
    total = shard_bytes(cfg, 1, 2)
    assert 6.7e9 * 2 < total < 6.8e9 * 2  # 6.74 B parameters in float16
    assert switch_path(SN40L).copy_ns(per_socket) == -(-per_socket // 100)


def test_lru_eviction_order():
    pool = ExpertPool(ATOM, {"a": 6 * GiB, "b": 6 * GiB, "c": 6 * GiB, "d": 6 * GiB})  # two fit in 16 GiB
    assert [pool.activate(e).evicted for e in "ab"] == [(), ()]
    assert pool.activate("a").hit  # a is now the most recently used
    sw = pool.activate("c")
    assert (sw.hit, sw.evicted, sw.nbytes) == (False, ("b",), 6 * GiB)
    assert pool.activate("d").evicted == ("a",)
    assert list(pool.resident) == ["c", "d"]
    assert pool.num_switches == 4 and pool.switch_ns_total == 4 * pool.path.copy_ns(6 * GiB)


def test_an_expert_in_use_is_not_evicted():
    pool = ExpertPool(ATOM, {"a": 6 * GiB, "b": 6 * GiB, "c": 6 * GiB})
    pool.acquire("a")
    pool.activate("b")
    assert pool.activate("c").evicted == ("b",)  # a is older but busy
    pool.acquire("c")
    with pytest.raises(OutOfTierMemory, match=r"expert 'b' needs 6.00 GiB of device memory; .* every resident "
                                              r"expert is in use"):
        pool.activate("b")
    pool.release("a")
    assert pool.activate("b").evicted == ("a",)
    with pytest.raises(ValueError, match="expert 'a' is not in use"):
        pool.release("a")


def test_staging_tier_capacity_errors_name_the_tier():
    with pytest.raises(OutOfTierMemory, match=r"the ddr tier cannot hold 8.00 GiB for expert 'e192': "
                                              r"0 B free of 1.50 TiB \(missing 8.00 GiB\)"):
        ExpertPool(SN40L, {f"e{i}": 8 * GiB for i in range(200)})
    with pytest.raises(OutOfTierMemory, match=r"the host tier cannot hold 8.00 GiB for expert 'e32'"):
        ExpertPool(ATOM, {f"e{i}": 8 * GiB for i in range(40)})


def test_bad_input():
    with pytest.raises(OutOfTierMemory, match=r"expert 'big' needs 20.00 GiB per card, more than the device tier "
                                              r"of atom-plus holds on its own \(16.00 GiB, missing 4.00 GiB\)"):
        ExpertPool(ATOM, {"big": 20 * GiB})
    with pytest.raises(OutOfTierMemory, match=r"missing 2.00 GiB"):  # KV cache space is not for experts
        ExpertPool(ATOM, {"a": 14 * GiB}, reserved_bytes=4 * GiB)
    with pytest.raises(ValueError, match=r"atom-plus has no memory tier 'ddr'"):
        ExpertPool(ATOM, {"a": GiB}, source="ddr")
    with pytest.raises(ValueError, match=r"unknown staging tier 'hbm'"):
        switch_path(SN40L, "hbm")
    with pytest.raises(KeyError, match=r"unknown model 'z'; the pool serves: a"):
        ExpertPool(ATOM, {"a": GiB}).activate("z")
    with pytest.raises(ValueError, match="at least one expert"):
        ExpertPool(ATOM, {})
    assert dataclasses.replace(ATOM, ddr_bytes=GiB, ddr_bw=1e9).tier("ddr").capacity == GiB
