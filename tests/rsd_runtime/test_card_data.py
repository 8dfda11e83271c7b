"""Data through the cards: tensors in and out of a card's arena, bit-exact; the KV store."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from conftest import assert_no_leaks
from devices.kv_cache import KVLayout
from devices.shm import Segment, segment_name
from rsd_runtime import CardError, Cluster, ClusterError


@pytest.fixture(scope="module")
def module_cluster(shm_prefix):
    with Cluster(num_devices=4, shm_prefix=shm_prefix) as c:
        yield c
    assert_no_leaks()


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "float32": torch.randn(17, 33, generator=g),
        "float16": torch.randn(64, 5, generator=g).half(),
        "bfloat16": torch.randn(3, 7, 11, generator=g).bfloat16(),
        "int8": torch.randint(-128, 128, (1000,), generator=g, dtype=torch.int8),
        "int32": torch.randint(-2**31, 2**31 - 1, (9, 9), generator=g, dtype=torch.int32),
        "int64": torch.randint(-2**62, 2**62, (4,), generator=g, dtype=torch.int64),
    }


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "int32", "int64"])
def test_put_get_bit_exact(module_cluster, dtype):
    t = _tensors()[dtype]
    card = len(dtype) % 4
    desc = module_cluster.put(card, f"t.{dtype}", t)
    assert desc["dtype"] == dtype and desc["shape"] == list(t.shape)
    back = module_cluster.get(card, f"t.{dtype}", as_torch=True)
    assert back.dtype == t.dtype and back.shape == t.shape
    assert back.view(torch.uint8).flatten().tolist() == t.view(torch.uint8).flatten().tolist()
    assert torch.equal(back, t)
    module_cluster.free(card, f"t.{dtype}")


def test_put_numpy_and_status_accounts_memory(module_cluster):
    a = np.arange(1000, dtype=np.float32)
    before = module_cluster.status()[3]["memory_used"]
    module_cluster.put(3, "np", a)
    assert module_cluster.status()[3]["memory_used"] == before + 4096  # 4000 bytes, 256-byte aligned
    np.testing.assert_array_equal(module_cluster.get(3, "np"), a)
    assert [t["name"] for t in module_cluster.tensors(3)] == ["np"]
    module_cluster.free(3, "np")
    assert module_cluster.status()[3]["memory_used"] == before


def test_arena_is_in_shared_memory(module_cluster):
    """The bytes a card holds are visible in its /dev/shm segment at the manifest's offset."""
    t = torch.arange(256, dtype=torch.int32)
    desc = module_cluster.put(2, "visible", t)
    seg = Segment(segment_name(module_cluster.run_name, 2, "weights"))
    raw = np.frombuffer(seg.buf, np.int32, 256, desc["offset"]).copy()
    seg.close()
    np.testing.assert_array_equal(raw, t.numpy())
    module_cluster.free(2, "visible")


def test_errors_of_commands_keep_the_card_alive(module_cluster):
    with pytest.raises(CardError, match="card 1: get failed: card 1: no tensor 'missing'"):
        module_cluster.get(1, "missing")
    module_cluster.put(1, "dup", np.zeros(3, np.int8))
    with pytest.raises(CardError, match="already in the arena"):
        module_cluster.put(1, "dup", np.zeros(3, np.int8))
    module_cluster.free(1, "dup")
    with pytest.raises(ClusterError, match="no card 7"):
        module_cluster.get(7, "x")
    assert module_cluster.status()[1]["state"] == "idle"


def test_malformed_frame_does_not_crash_a_card(module_cluster):
    module_cluster.control._sender().send_multipart([b"card0", b"\xc1 not msgpack", b"junk"])
    module_cluster.control._sender().send_multipart([b"card0", b"\x93\x01\x02\x03"])  # msgpack list, no op
    time.sleep(0.2)
    assert module_cluster.status()[0]["state"] == "idle"
    with pytest.raises(CardError, match="unknown op 'bogus'"):
        module_cluster.call(0, "bogus")


def test_kv_cache_lives_in_shared_memory(module_cluster):
    layout = KVLayout(num_layers=2, num_blocks=8, block_size=16, num_kv_heads=2, head_dim=8, dtype="float16")
    used = module_cluster.status()[0]["memory_used"]
    reply = module_cluster.kv_init(0, layout)
    assert reply["nbytes"] == 2 * 2 * 8 * 16 * 2 * 8 * 2
    assert module_cluster.status()[0]["memory_used"] == used + layout.nbytes
    seg = Segment(reply["segment"])
    assert seg.size == layout.nbytes
    seg.close()




@pytest.mark.parametrize("fields, names", [
    ({"name": "neg", "dtype": "float32", "shape": [-1, -4]}, "shape\\[0\\] is -1"),
    ({"name": "neg2", "dtype": "float32", "shape": [4, -1]}, "shape\\[1\\] is -1"),
    ({"name": "flt", "dtype": "float32", "shape": [2.5]}, "shape\\[0\\] is 2.5"),
    ({"name": "deep", "dtype": "float32", "shape": [1] * 9}, "shape must be a list"),
    ({"name": ["x"], "dtype": "float32", "shape": [1]}, "name must be a string"),
    ({"name": "dt", "dtype": ["float32"], "shape": [1]}, "unknown dtype"),
])
def test_puts_with_bad_fields_are_refused_by_name(module_cluster, fields, names):
    with pytest.raises(CardError, match=names):
        module_cluster.control.call(0, "put", fields, [b"\0" * 16], timeout=10)
    assert all(t["name"] not in ("neg", "neg2") for t in module_cluster.tensors(0))


@pytest.mark.parametrize("fields, names", [
    ({"group": [0, 99]}, "card 99 out of range for 4 cards"),
    ({"group": [0, 0]}, "ranks must be distinct"),
    ({"group": [1, 2]}, "card 0 is not in group"),
    ({"group": [0, 1], "root": -1}, "root -1 is not a rank"),
    ({"group": [0, 1], "root": 2}, "root 2 is not a rank"),
    ({"group": [0, 1], "tag": -1}, "tag is -1"),
])
def test_collectives_with_bad_indices_are_refused_by_name(module_cluster, fields, names):
    with pytest.raises(CardError, match=names):
        module_cluster.control.call(0, "collective", {"kind": "broadcast", "dtype": "float32", **fields},
                                    [np.ones(4, np.float32)], timeout=10)
    out = module_cluster.collective("all_reduce", [np.ones(3, np.float32)] * 4)
    assert all(o.tolist() == [4.0] * 3 for o in out["outputs"])
