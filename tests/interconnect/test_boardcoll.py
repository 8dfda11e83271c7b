"""Small collectives on the board give the bits and the emulated times of the same calls through messages."""
from __future__ import annotations

import numpy as np
import pytest

from interconnect.links import LinkDegradation
from interconnect.shmring import SUPPORTED
from rsd_runtime import Cluster

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="shared-memory rings run on x86-64 only")
N = 3


@pytest.fixture(scope="module")
def pair(shm_prefix):
    """The same three cards twice: on one host (rings and board), and over tcp (messages only)."""
    with Cluster(num_devices=N, shm_prefix=shm_prefix) as ipc, \
            Cluster(num_devices=N, shm_prefix=shm_prefix, transport="tcp") as tcp:
        yield ipc, tcp


def _inputs(dtype: str, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    if dtype == "int32":
        return [rng.integers(-1000, 1000, count, dtype=np.int32) for _ in range(N)]
    return [rng.standard_normal(count).astype(np.float32).astype(dtype) for _ in range(N)]


def _board_calls(cluster) -> int:
    return sum(row["fabric_board_calls"] for row in cluster.status())


def _run(cluster, kind, inputs, algo, op):
    for c in range(N):
        cluster.call(c, "clock_reset")
    return cluster.collective(kind, inputs, algo=algo, op=op)


@pytest.mark.parametrize("kind,dtype,op", [("all_reduce", "float32", "sum"), ("all_reduce", "float16", "avg"),
                                           ("all_reduce", "int32", "max"), ("all_gather", "float32", "sum")])
@pytest.mark.parametrize("count", [1, 1000, 4100])  # 4100 float32 are past the board's 16 KiB: messages
@pytest.mark.parametrize("algo", ["auto", "one-shot"])
def test_board_calls_equal_message_calls_bit_for_bit_and_nanosecond_for_nanosecond(pair, kind, dtype, op,
                                                                                    count, algo):
    ipc, tcp = pair
    inputs = _inputs(dtype, count, count)
    before = _board_calls(ipc)
    for _ in range(2):  # the second call starts from the clocks and ports the first left
        got, want = _run(ipc, kind, inputs, algo, op), _run(tcp, kind, inputs, algo, op)
        assert got["emu_ns"] == want["emu_ns"]
        for a, b in zip(got["outputs"], want["outputs"]):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    on_board = count * inputs[0].itemsize <= 16328  # the board's entry: 2045 words less 4 values
    assert _board_calls(ipc) - before == (2 * N if on_board else 0)


def test_a_degraded_link_sends_the_whole_group_back_to_messages(pair):  # last: the fault stays on the cards
    ipc, tcp = pair
    inputs = _inputs("float32", 256, 7)
    clean = _run(ipc, "all_reduce", inputs, "one-shot", "sum")["emu_ns"]
    for cluster in pair:
        cluster.degrade_link(2, 0, LinkDegradation(0.25, 5_000, from_ns=0))
    before = _board_calls(ipc)
    got, want = _run(ipc, "all_reduce", inputs, "one-shot", "sum"), _run(tcp, "all_reduce", inputs, "one-shot", "sum")
    assert got["emu_ns"] == want["emu_ns"] and got["emu_ns"] != clean
    assert all(np.array_equal(a, b) for a, b in zip(got["outputs"], want["outputs"]))
    assert _board_calls(ipc) == before  # no card ran it on the board, though only card 2 is degraded
