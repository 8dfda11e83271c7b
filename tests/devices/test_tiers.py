"""Memory tiers of the device specs and per-tier capacity."""
from __future__ import annotations

import dataclasses

import pytest

from devices.spec import GiB, get_spec
from devices.tiers import OutOfTierMemory, TieredMemory


def test_sn40l_has_three_tiers_with_published_sizes():
    tiers = get_spec("sn40l").tiers()
    assert list(tiers) == ["sram", "device", "ddr"]
    assert tiers["sram"].capacity == 520 << 20
    assert tiers["device"].capacity == 64 * GiB and tiers["device"].bandwidth == 1.6e12
    assert tiers["ddr"].capacity == 1536 * GiB and tiers["ddr"].bandwidth == 100e9


def test_a_card_without_ddr_has_no_ddr_tier():
    spec = get_spec("atom-plus")
    assert list(spec.tiers()) == ["sram", "device"]
    with pytest.raises(ValueError, match=r"atom-plus has no memory tier 'ddr'; its tiers: sram, device"):
        spec.tier("ddr")


def test_a_ddr_tier_needs_size_and_bandwidth():
    with pytest.raises(ValueError, match="needs both ddr_bytes and ddr_bw"):
        dataclasses.replace(get_spec("atom-plus"), ddr_bytes=GiB)


def test_each_tier_enforces_its_own_capacity():
    mem = TieredMemory(3, get_spec("sn40l").tiers())
    mem.reserve("device", 60 * GiB, "expert a")
    mem.reserve("ddr", 1000 * GiB, "experts")  # the DDR tier is untouched by device use
    with pytest.raises(OutOfTierMemory, match=r"card 3: the device tier cannot hold 8.00 GiB for expert b: "
                                              r"4.00 GiB free of 64.00 GiB \(missing 4.00 GiB\)"):
        mem.reserve("device", 8 * GiB, "expert b")
    with pytest.raises(OutOfTierMemory, match=r"the ddr tier .* \(missing 464.00 GiB\)"):
        mem.reserve("ddr", 1000 * GiB, "more experts")
    mem.release("device", 60 * GiB)
    mem.reserve("device", 8 * GiB, "expert b")
    assert mem.used == {"sram": 0, "device": 8 * GiB, "ddr": 1000 * GiB}
    with pytest.raises(ValueError, match=r"card 3 has no memory tier 'l3'; its tiers: sram, device, ddr"):
        mem.reserve("l3", 1, "x")
    with pytest.raises(ValueError, match="releasing"):
        mem.release("sram", 1)


def test_a_staging_store_is_a_segment_of_its_own_with_its_tier_capacity(shm_prefix):
    from devices.arena import WeightArena
    from devices.shm import new_run_name, remove_run, run_segments
    from devices.tiers import TierCapacity, staging_tier

    spec = dataclasses.replace(get_spec("atom-plus"), ddr_bytes=1 << 20, ddr_bw=100e9)
    run = new_run_name(shm_prefix)
    store = WeightArena(run, 2, TierCapacity(2, staging_tier(spec, "ddr")), kind="ddr")
    try:
        assert sorted(p.name for p in run_segments(run)) == [f"{run}_c002_ddr", f"{run}_c002_ddrmanifest"]
        assert (run_segments(run)[0].stat().st_mode & 0o777) == 0o600
        store.allocate("a/w", "float32", [128, 1024])  # 512 KiB
        store.write("a/w", bytes(range(256)) * 2048)
        assert bytes(store.view("a/w")[:4]) == b"\x00\x01\x02\x03"
        with pytest.raises(OutOfTierMemory, match=r"card 2: the ddr tier cannot hold 768.00 KiB for tensor 'b/w' "
                                                  r"\(float32\[192, 1024\]\): 512.00 KiB free of 1.00 MiB "
                                                  r"\(missing 256.00 KiB\)"):
            store.allocate("b/w", "float32", [192, 1024])
        assert store.names_under("a/") == {"w": "a/w"} and store.names_under("b/") == {}
    finally:
        store.close()
        remove_run(run)
    with pytest.raises(ValueError, match=r"atom-plus has no memory tier 'ddr'"):
        staging_tier(get_spec("atom-plus"), "ddr")
    with pytest.raises(ValueError, match=r"unknown staging tier 'hbm'"):
        staging_tier(spec, "hbm")
    assert staging_tier(get_spec("atom-plus"), "host").capacity == 256 * GiB
