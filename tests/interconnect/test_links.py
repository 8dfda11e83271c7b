import dataclasses

import pytest

from interconnect.links import LinkSpec, get_link, link_names, transfer_ns

MiB = 1 << 20


def _spec(**overrides) -> LinkSpec:
    fields = dict(name="test", bandwidth_gbps=10.0, latency_ns=100, duplex=True, raw_gbps=12.0, source="test")
    fields.update(overrides)
    return LinkSpec(**fields)


def test_presets_are_known():
    assert {"pcie-gen5-x16", "pcie-gen4-x16", "ib-ndr", "roce-100g"} <= set(link_names())


def test_unknown_link_lists_known_names():
    with pytest.raises(ValueError, match="unknown link 'pcie-gen6'") as err:
        get_link("pcie-gen6")
    for name in link_names():
        assert name in str(err.value)


def test_pcie_gen5_figures():
    spec = get_link("pcie-gen5-x16")
    # 32 GT/s * 16 lanes * 128/130 / 8 bits = 63.015 GB/s per direction
    assert spec.raw_gbps == pytest.approx(32 * 16 * 128 / 130 / 8, abs=1e-3)
    assert spec.bandwidth_gbps == 55.45
    assert spec.efficiency == pytest.approx(0.88, abs=1e-3)
    assert spec.duplex
    assert 0 < 2 * spec.latency_ns <= 1000  # card -> switch -> card within 1 us


def test_pcie_gen4_is_half_of_gen5():
    gen4, gen5 = get_link("pcie-gen4-x16"), get_link("pcie-gen5-x16")
    assert gen4.raw_gbps == pytest.approx(gen5.raw_gbps / 2, abs=1e-3)
    assert gen4.efficiency == pytest.approx(gen5.efficiency, abs=1e-3)


def test_network_links_are_slower_and_farther_than_pcie():
    pcie, ndr, roce = get_link("pcie-gen5-x16"), get_link("ib-ndr"), get_link("roce-100g")
    assert ndr.raw_gbps == 50.0  # 400 Gb/s
    assert roce.raw_gbps == 12.5  # 100 Gb/s
    assert roce.bandwidth_gbps < ndr.bandwidth_gbps < pcie.bandwidth_gbps
    assert pcie.latency_ns < ndr.latency_ns < roce.latency_ns


def test_every_preset_names_a_source_and_is_consistent():
    for name in link_names():
        spec = get_link(name)
        assert spec.name == name
        assert spec.source
        assert 0.8 < spec.efficiency <= 1.0
        assert isinstance(spec.latency_ns, int)


def test_64mib_on_pcie_gen5():
    # 67108864 B / 55.45 B/ns = 1210259.04 ns -> 1210260
    assert transfer_ns(get_link("pcie-gen5-x16"), 64 * MiB) == 1_210_260


def test_64mib_on_other_presets():
    assert transfer_ns(get_link("pcie-gen4-x16"), 64 * MiB) == 2_420_082  # / 27.73 = 2420081.6
    assert transfer_ns(get_link("ib-ndr"), 64 * MiB) == 1_369_569  # / 49.0 = 1369568.7
    assert transfer_ns(get_link("roce-100g"), 64 * MiB) == 5_592_406  # / 12.0 = 5592405.3


def test_exact_multiples_do_not_round_up():
    spec = get_link("pcie-gen5-x16")
    assert transfer_ns(spec, 1_109_000) == 20_000  # 55.45 = 1109/20
    assert transfer_ns(spec, 1_109_001) == 20_001
    assert transfer_ns(_spec(bandwidth_gbps=0.1, raw_gbps=1.0), 3) == 30


def test_small_and_zero_sizes():
    spec = get_link("pcie-gen5-x16")
    assert transfer_ns(spec, 0) == 0
    assert transfer_ns(spec, 1) == 1
    assert transfer_ns(spec, 56) == 2


def test_transfer_ns_is_integer_and_monotonic():
    spec = get_link("pcie-gen5-x16")
    times = [transfer_ns(spec, n) for n in range(0, 100_000, 777)]
    assert all(type(t) is int for t in times)
    assert times == sorted(times)


def test_transfer_ns_rejects_bad_sizes():
    spec = get_link("pcie-gen5-x16")
    with pytest.raises(ValueError):
        transfer_ns(spec, -1)
    with pytest.raises(TypeError):
        transfer_ns(spec, 1.5)


@pytest.mark.parametrize(
    "overrides, error",
    [
        (dict(bandwidth_gbps=0.0), ValueError),
        (dict(bandwidth_gbps=-1.0), ValueError),
        (dict(raw_gbps=0.0), ValueError),
        (dict(bandwidth_gbps=13.0), ValueError),  # above raw
        (dict(latency_ns=-1), ValueError),
        (dict(latency_ns=1.5), TypeError),
        (dict(name=""), ValueError),
    ],
)
def test_spec_checks(overrides, error):
    with pytest.raises(error):
        _spec(**overrides)


def test_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_link("pcie-gen5-x16").bandwidth_gbps = 1.0
