"""Small collectives on the board: the very data and emulated figures of the call's messages.

Two 4-card clusters run the same calls on the same inputs: one sends every message
(RSD_BOARD_DATA=0), the other publishes each card's buffer on its board and reads
its peers' in place. Outputs must be bit-identical and every card's clock must move
by the same nanoseconds; the board cluster's cards must really have used the board.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_no_leaks
from interconnect.links import LinkDegradation
from interconnect.shmring import BOARD_DATA_BYTES, SUPPORTED
from rsd_runtime import Cluster

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="shared-memory rings run on x86-64 only")


@pytest.fixture(scope="module")
def clusters(shm_prefix):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RSD_BOARD_DATA", "0")  # the cards inherit it
        messages = Cluster(num_devices=4, shm_prefix=shm_prefix).start()
    try:
        with Cluster(num_devices=4, shm_prefix=shm_prefix) as board:
            yield messages, board
    finally:
        messages.shutdown()
    assert_no_leaks()


def _board_calls(cluster) -> int:
    return sum(row["fabric_board_calls"] for row in cluster.status())


def _raw(out) -> bytes:
    return (out.view(torch.int16).numpy() if isinstance(out, torch.Tensor) else np.asarray(out)).tobytes()


def _inputs(count: int, dtype: str, n: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(count, generator=gen).to(getattr(torch, dtype)) if dtype == "bfloat16"
            else torch.randn(count, generator=gen).numpy().astype(dtype) for _ in range(n)]


def _same(messages, board, kind: str, inputs: list, **kw) -> dict:
    a = messages.collective(kind, inputs, **kw)
    b = board.collective(kind, inputs, **kw)
    assert [_raw(o) for o in b["outputs"]] == [_raw(o) for o in a["outputs"]]
    assert b["emu_ns"] == a["emu_ns"]
    return b


CASES = [  # kind, elements, dtype, op, algo
    ("all_reduce", 3, "float32", "sum", "auto"),
    ("all_reduce", 1024, "bfloat16", "sum", "auto"),  # a decode step's activations
    ("all_reduce", 1000, "float32", "avg", "one-shot"),
    ("all_reduce", 257, "float16", "max", "auto"),
    ("all_reduce", BOARD_DATA_BYTES // 4, "float32", "sum", "one-shot"),  # the largest that fits
    ("all_gather", 5, "float32", "sum", "auto"),
    ("all_gather", 2048, "bfloat16", "sum", "ring"),  # gathers the same bytes whatever the algorithm
    ("all_gather", 999, "float32", "sum", "tree"),
]


@pytest.mark.parametrize("kind,count,dtype,op,algo", CASES)
def test_board_calls_give_the_messages_data_and_clocks(clusters, kind, count, dtype, op, algo):
    messages, board = clusters
    before = _board_calls(board)
    for i in range(3):  # calls in a row alternate the board's halves
        inputs = _inputs(count, dtype, 4, seed=hash((kind, count, dtype, op, algo, i)) % 2**31)
        _same(messages, board, kind, inputs, op=op, algo=algo)
    assert _board_calls(board) == before + 3 * 4  # every card, every call
    assert _board_calls(messages) == 0


def test_skewed_clocks_and_subgroups_give_the_messages_figures(clusters):
    messages, board = clusters
    for group in ([0, 2, 3], [1, 3], [0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3]):  # cards enter at different clocks
        for kind in ("all_reduce", "all_gather"):
            _same(messages, board, kind, _inputs(300, "float32", len(group), seed=len(group)), group=group)


def test_calls_too_big_or_not_one_shot_send_their_messages(clusters):
    messages, board = clusters
    before = _board_calls(board)
    _same(messages, board, "all_reduce", _inputs(BOARD_DATA_BYTES // 4 + 1, "float32", 4, 1), algo="one-shot")
    _same(messages, board, "all_reduce", _inputs(64, "float32", 4, 2), algo="ring")  # its own reduction order
    _same(messages, board, "reduce_scatter", _inputs(64, "float32", 4, 3))
    assert _board_calls(board) == before


def test_a_link_fault_on_one_card_sends_the_whole_groups_messages(clusters, shm_prefix):
    """A degraded link's figures come from its messages: the card says so and every member sends.
    (Asks for ``clusters`` so that the module's leak check runs after it.)"""
    slow = LinkDegradation(bw_factor=0.25, added_latency_ns=5_000)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RSD_BOARD_DATA", "0")
        messages = Cluster(num_devices=3, shm_prefix=shm_prefix).start()
    try:
        with Cluster(num_devices=3, shm_prefix=shm_prefix) as board:
            inputs = _inputs(512, "float32", 3, 4)
            clean = _same(messages, board, "all_reduce", inputs)
            for c in (messages, board):
                c.degrade_link(2, 0, slow)
            hurt = _same(messages, board, "all_reduce", inputs)
            assert hurt["emu_ns"][0] > clean["emu_ns"][0]  # the fault shows
            assert _board_calls(board) == 3  # only the clean call went on the board
            _same(messages, board, "all_gather", inputs)
            assert _board_calls(board) == 3
    finally:
        messages.shutdown()
