"""Step plans on their own channel: straight from the stepping thread to the cards and back.

The plan and the replies skip the control plane's I/O thread; what must still hold: the
tokens, the order of replies of steps in flight together, only the run's processes heard,
a dead card failing the step it is in at once, and outputs merged by a stream interval.
"""
from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from conftest import assert_no_leaks, wait_until
from interconnect import auth, wire
from rsd_runtime.async_llm import AsyncLLM
from rsd_runtime.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = ["The weather today is", "Computers can", "A small program"]


@pytest.fixture(scope="module")
def allm(shm_prefix):
    llm = AsyncLLM(tensor_parallel_size=2, shm_prefix=shm_prefix, progress=False, heartbeat_timeout=3.0,
                   restart_cards=False)
    yield llm
    llm.close()
    assert_no_leaks()


def _generate(allm, prompts, params=GREEDY):
    """Every prompt at once through the async front; the deltas of each, in order."""
    async def one(p):
        return [out async for out in allm.generate(p, params)]

    async def every():
        return await asyncio.gather(*(one(p) for p in prompts))

    return asyncio.run(every())


def _tokens(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


@pytest.fixture(scope="module")
def reference(allm):
    return [_tokens(d) for d in _generate(allm, PROMPTS)]


@pytest.fixture(scope="module")
def reference_text(allm):
    return ["".join(d.text for d in deltas) for deltas in _generate(allm, PROMPTS)]


def test_steps_go_on_the_step_channel_and_give_the_same_tokens(allm, reference):
    control = allm.engine.cluster.control
    ids_before = repr(control._ids)  # the control plane's request counter: steps do not use it
    steps_before = allm.engine.stats.steps
    assert [_tokens(d) for d in _generate(allm, PROMPTS)] == reference
    assert allm.engine.stats.steps > steps_before
    assert repr(control._ids) == ids_before
    assert not allm.engine.cluster.steps._open  # every step's bookkeeping is gone


def test_two_steps_in_flight_get_their_own_replies(shm_prefix):
    """Replies of two steps sent before either is gathered (instances stepped together) are kept
    apart by request id, gathered in either order, and run in the order sent."""
    from devices.step import SeqSlice, StepPlan
    from rsd_runtime.engine import LLMEngine
    from rsd_runtime.tiny_model import ensure_tiny_model

    engine = LLMEngine(str(ensure_tiny_model()), 2, phantom=True, shm_prefix=shm_prefix, progress=False)
    try:
        steps, cards = engine.cluster.steps, engine.cards
        plan = StepPlan(engine.emu_now, [SeqSlice(0, 4, 0, [0])], [3])
        with steps.lock:
            first, second = steps.send(cards, plan.pack()), steps.send(cards, plan.pack())
            got2, fail2 = steps.gather(second, cards)
            got1, fail1 = steps.gather(first, cards)
            steps.discard(first)
            steps.discard(second)
        assert fail1 is None and fail2 is None
        assert sorted(got1) == sorted(got2) == sorted(cards)
        assert all(h["id"] == first for h, _ in got1.values()) and all(h["id"] == second for h, _ in got2.values())
        # the second step ran after the first on every card: it ends later on the emulated clock
        assert all(got2[c][0]["clock_ns"] > got1[c][0]["clock_ns"] for c in cards)
        assert not steps._open and not steps._replies
    finally:
        engine.close()


def test_only_the_runs_processes_are_heard_on_the_step_channel(allm, reference):
    cluster = allm.engine.cluster
    address = f"ipc://{cluster.run_dir}/steps"
    refused = cluster._auth.refused
    stranger = zmq.Context.instance().socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    auth.make_client(stranger, "guess")
    stranger.connect(address)
    assert wait_until(lambda: cluster._auth.refused > refused, 3.0)
    stranger.close()

    before = cluster.control.malformed.copy()
    bad = [{"op": "reply", "id": 1, "ok": True, "clock_ns": 1}, {"op": "hello", "card": 0, "pid": 1, "secret": "x"},
           {"op": 7}]
    for identity in (b"card9", b"intruder"):
        forger = zmq.Context.instance().socket(zmq.DEALER)
        forger.setsockopt(zmq.LINGER, 0)
        forger.setsockopt(zmq.IDENTITY, identity)
        auth.make_client(forger, cluster._secret)
        forger.connect(address)
        for h in bad:
            forger.send_multipart([wire.pack(h), b"x"])
        forger.send(b"\xc1not msgpack")
        time.sleep(0.2)
        forger.close()
    # the stepping thread reads them while it steps: they are counted, dropped, and change no token
    assert [_tokens(d) for d in _generate(allm, PROMPTS)] == reference
    assert cluster.control.malformed["identity"] >= before["identity"] + 2 * (len(bad) + 1)


def test_stream_interval_merges_deltas_and_keeps_the_tokens(allm, reference, reference_text):
    allm.stream_interval = 5
    try:
        outs = _generate(allm, PROMPTS)
    finally:
        allm.stream_interval = 1
    assert [_tokens(d) for d in outs] == reference
    assert ["".join(d.text for d in deltas) for deltas in outs] == reference_text
    for deltas in outs:
        sizes = [len(d.token_ids) for d in deltas]
        assert sizes[0] == 1  # the first token goes out at once
        assert all(n >= 5 for n in sizes[1:-1]) and sum(sizes) == GREEDY.max_tokens, sizes
        assert deltas[-1].finished and sum(1 for d in deltas if d.finished) == 1


@pytest.mark.restarts_cards
def test_a_card_killed_while_the_host_waits_fails_the_step_within_2_s(allm, reference):
    engine = allm.engine
    assert engine.cluster.inject(1, "kill", at_step=2) >= 2
    t0 = time.monotonic()
    with pytest.raises(Exception, match=r"card 1 .*SIGKILL"):
        _generate(allm, PROMPTS[:1])
    assert time.monotonic() - t0 < 2.0
    assert isinstance(engine.dead, Exception)
    allm.recover()
    assert engine.dead is None
    assert [_tokens(d) for d in _generate(allm, PROMPTS)] == reference
