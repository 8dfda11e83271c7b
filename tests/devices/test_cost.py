"""The cost model against figures worked out by hand from the datasheet numbers."""
from __future__ import annotations

import math

import pytest

from devices.cost import CostModel, OpCost
from devices.spec import DeviceSpec, get_spec, load_spec_file

ATOM = get_spec("atom-plus")  # 32 TFLOPS bf16, 256 GB/s, efficiencies 0.7 / 0.8, 2 us per op


def test_matmul_by_hand():
    cm = CostModel(ATOM, "bfloat16", "bfloat16")
    # 8 tokens through a 4096 -> 1024 projection
    cost = cm.linear(8, 4096, 1024)
    assert cost == OpCost(flops=2 * 8 * 4096 * 1024, bytes=4096 * 1024 * 2 + 8 * (4096 + 1024) * 2)
    compute_ns = 67_108_864 / (32e12 * 0.7) * 1e9  # 2996 ns
    memory_ns = 8_470_528 / (256e9 * 0.8) * 1e9  # 41360 ns: a decode matmul is memory bound
    assert memory_ns > compute_ns
    assert cm.time_ns(cost) == math.ceil(memory_ns) + 2000 == 43_360


def test_prefill_matmul_is_compute_bound_by_hand():
    cm = CostModel(ATOM, "bfloat16", "bfloat16")
    cost = cm.linear(2048, 4096, 4096)
    compute_ns = 2 * 2048 * 4096 * 4096 / 22.4e12 * 1e9
    assert cm.time_ns(cost) == math.ceil(compute_ns) + 2000 == 3_069_834


def test_attention_decode_step_by_hand():
    cm = CostModel(ATOM, "bfloat16", "bfloat16")
    # one new token, 1024 tokens of context, 8 query heads, 2 kv heads of 128
    cost = cm.attention([(1, 1024)], num_heads=8, num_kv_heads=2, head_dim=128)
    flops = 4 * 1 * 1024 * 8 * 128 + 6 * 1 * (8 + 2) * 128
    read_kv = 2 * 1024 * 2 * 128 * 2
    write_kv = 2 * 1 * 2 * 128 * 2
    qkv_out = 2 * 1 * (8 + 2 * 2) * 128 * 2
    assert cost == OpCost(flops, read_kv + write_kv + qkv_out)
    assert cm.time_ns(cost) == math.ceil((1_048_576 + 1024 + 6144) / 204.8) + 2000 == 7155


def test_ring_all_reduce_by_hand(shm_prefix):
    """1 MiB over 4 cards on pcie-gen5-x16: 3 reduce-scatter steps, then 3 all-gather steps."""
    from rsd_runtime import Cluster

    chunk = (1 << 20) // 4
    occ = math.ceil(chunk / 55.45)  # 4728 ns at the link's effective 55.45 GB/s
    lat = 2 * 350  # card -> switch -> card
    reduce_tail = math.ceil(3 * chunk / 204.8)  # 3840 ns: the last slice reduced after the last byte
    expected = 3 * (lat + occ + reduce_tail) + 3 * (lat + occ)
    assert expected == 44_088
    with Cluster(num_devices=4, shm_prefix=shm_prefix, phantom=True) as c:
        res = c.bench_collective("all_reduce", (1 << 20) // 4, "float32", algo="ring", warmup=0, iters=1)
    assert res["emu_ns"] == expected


def test_custom_card_from_toml(tmp_path):
    path = tmp_path / "atom-max.toml"
    path.write_text('name = "atom-max"\nbase = "atom-plus"\nmemory_bytes = 68719476736\n'
                    'memory_bw = 1.0e12\n[peak_ops]\nbfloat16 = 64e12\n')
    spec = get_spec(str(path))
    assert spec.name == "atom-max" and spec.memory_bytes == 64 << 30 and spec.memory_bw == 1e12
    assert spec.peak_ops["bfloat16"] == 64e12 and spec.peak_ops["int8"] == ATOM.peak_ops["int8"]
    assert spec.tdp_watts == ATOM.tdp_watts
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nbase = "atom-plus"\nflux_capacitor = 1\n')
    with pytest.raises(ValueError, match="unknown fields \\['flux_capacitor'\\]"):
        load_spec_file(str(bad))
    with pytest.raises(ValueError, match="memory_bw must be positive"):
        DeviceSpec(name="z", peak_ops={"float32": 1.0}, memory_bytes=1, memory_bw=0, sram_bytes=0, tdp_watts=1)


def test_presets_carry_their_datasheet_figures():
    assert ATOM.peak_ops["float16"] == 32e12 and ATOM.peak_ops["int8"] == 128e12
    assert ATOM.memory_bw == 256e9 and ATOM.sram_bytes == 64 << 20 and ATOM.tdp_watts == 75
    sn = get_spec("sn40l")
    assert sn.peak_ops["bfloat16"] == 638e12 and sn.memory_bytes == 64 << 30 and sn.sram_bytes == 520 << 20
    assert get_spec("gpu-h100").memory_bytes == 80 << 30
