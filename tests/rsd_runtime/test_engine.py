"""The long-lived engine: request lifecycle, deltas, state that goes with the request, many callers."""
from __future__ import annotations

import asyncio
import signal
import time

import numpy as np
import pytest

from conftest import assert_no_leaks
from rsd_runtime.async_llm import AsyncLLM, EngineError
from rsd_runtime.engine import EngineDeadError
from rsd_runtime.llm import LLM
from rsd_runtime.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = ["The weather today is", "Computers can", "A small program", [5, 6, 7]]


@pytest.fixture(scope="module")
def llm(shm_prefix):
    with LLM(tensor_parallel_size=2, shm_prefix=shm_prefix, progress=False) as llm:
        yield llm
    assert_no_leaks()


@pytest.fixture(scope="module")
def alone(llm):
    """What each prompt gives when it runs by itself."""
    return [llm.generate([p], GREEDY)[0] for p in PROMPTS]


def test_deltas_add_up_and_state_goes_with_the_request(llm, alone):
    eng = llm.engine
    eng.add_request("a", PROMPTS[0], GREEDY)
    eng.add_request("b", PROMPTS[1], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2))
    tokens, texts, finished = {"a": [], "b": []}, {"a": "", "b": ""}, {}
    while eng.has_unfinished():
        for out in eng.step():
            assert len(out.token_ids) == 1
            tokens[out.request_id] += out.token_ids
            texts[out.request_id] += out.text
            if out.request_id == "b":
                assert out.logprobs[0].token_id == out.token_ids[0] and len(out.logprobs[0].top) == 2
            if out.finished:
                finished[out.request_id] = out
    assert tokens["a"] == alone[0].token_ids and texts["a"] == alone[0].text
    assert tokens["b"] == alone[1].token_ids[:3] and finished["b"].finish_reason == "length"
    m = finished["a"].metrics
    assert m["num_output_tokens"] == 8 and m["emu_ttft_s"] > 0 and m["queue_s"] >= 0
    assert eng.requests == {} and eng._by_seq == {} and not eng.scheduler.has_unfinished()
    assert eng.blocks.num_free_blocks == eng.num_kv_blocks


def test_steps_mixing_decodes_and_prefills_give_each_request_what_it_gives_alone(llm, alone, monkeypatch):
    """The one-token rows of a mixed step are attended as a batch, the prompts one by one; a one-token
    prompt goes with the batch. Requests join while others decode, so most steps mix."""
    eng = llm.engine
    one = llm.generate([[9]], GREEDY)[0]  # a one-token prompt, alone
    shapes = []
    schedule = eng.scheduler.schedule

    def recorded():
        batch = schedule()
        if batch is not None:
            shapes.append(sorted(s.num_tokens for s in batch.seqs))
        return batch

    monkeypatch.setattr(eng.scheduler, "schedule", recorded)
    joining = [("p0", PROMPTS[0]), ("one", [9]), ("p1", PROMPTS[1]), ("p3", PROMPTS[3]), ("p2", PROMPTS[2])]
    tokens = {}
    while joining or eng.has_unfinished():
        if joining:
            rid, prompt = joining.pop(0)
            eng.add_request(rid, prompt, GREEDY)
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    assert any(s[0] == 1 and s[-1] > 1 for s in shapes), shapes  # decodes and a prompt in one step
    assert tokens["one"] == one.token_ids
    for rid, i in (("p0", 0), ("p1", 1), ("p2", 2), ("p3", 3)):
        assert tokens[rid] == alone[i].token_ids, rid


def test_abort_frees_blocks_at_once(llm):
    eng = llm.engine
    eng.add_request("x", PROMPTS[0], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    eng.step()
    assert eng.blocks.num_free_blocks < eng.num_kv_blocks
    assert eng.abort_request("x") and not eng.abort_request("x")
    assert eng.blocks.num_free_blocks == eng.num_kv_blocks and eng.requests == {}


def test_one_bad_prompt_in_a_batch_leaves_nothing_queued(llm, alone):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([PROMPTS[0], [1, 2, 99999]], GREEDY)
    eng = llm.engine
    assert eng.requests == {} and not eng.scheduler.has_unfinished()
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("dup", [1], GREEDY)
        eng.add_request("dup", [1], GREEDY)
    eng.abort_request("dup")
    assert llm.generate([PROMPTS[1]], GREEDY)[0].token_ids == alone[1].token_ids


def test_a_stream_never_shows_the_stop_string(llm, alone):
    text = alone[0].text
    stop = text[4:7]
    streamed = []
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=[stop]),
                       on_token=lambda i, tok, new: streamed.append(new))[0]
    assert out.finish_reason == "stop" and out.text == text[:text.index(stop)]
    assert "".join(streamed) == out.text
    shown = ""
    for piece in streamed:
        shown += piece
        assert stop not in shown


@pytest.mark.parametrize("table, names", [([-1], "KV block -1 does not exist"), ([10 ** 9], "KV block 1000000000"),
                                          ([0, 0], "named twice"), (["a"], "must hold ints")])
def test_a_step_naming_a_bad_kv_block_is_refused_and_overwrites_nothing(llm, alone, table, names):
    from devices.step import SeqSlice, StepPlan
    from rsd_runtime import CardError

    n = 17 if len(table) == 2 else 1
    blob = StepPlan(0, [SeqSlice(0, n, 0, table)], [0], np.ones(n, np.int32)).pack()
    for card in llm.engine.cards:
        with pytest.raises(CardError, match=names):
            llm.engine.cluster.control.call(card, "step", None, [blob], timeout=10)
    assert llm.generate([PROMPTS[0]], GREEDY)[0].token_ids == alone[0].token_ids


def test_many_async_callers_share_the_batch_and_each_gets_its_own(llm, alone):
    async def main(allm):
        async def one(i):
            toks = []
            async for out in allm.generate(PROMPTS[i % len(PROMPTS)], GREEDY):
                toks += out.token_ids
            return toks

        async def early_exit():
            async for out in allm.generate(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0,
                                                                       ignore_eos=True)):
                break  # the caller goes away: its request is aborted

        results = await asyncio.gather(*[one(i) for i in range(12)], early_exit())
        return results[:12]

    allm = AsyncLLM(engine=llm.engine)
    try:
        results = asyncio.run(main(allm))
        for i, toks in enumerate(results):
            assert toks == alone[i % len(PROMPTS)].token_ids
        eng = llm.engine
        deadline = time.monotonic() + 2
        while eng.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.requests == {} and eng.blocks.num_free_blocks == eng.num_kv_blocks
    finally:
        allm._stop.set()  # the engine belongs to the module's LLM: stop the thread, keep the cards
        allm._wake.set()
        allm._thread.join(5)


def test_a_dead_card_fails_the_step_at_once_and_recover_restores_the_tokens(shm_prefix):
    with LLM(tensor_parallel_size=2, shm_prefix=shm_prefix, progress=False) as llm:
        before = llm.generate([PROMPTS[0]], GREEDY)[0].token_ids
        eng = llm.engine
        eng.cluster.kill(1, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match="card 1"):
            llm.generate([PROMPTS[0]], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
        assert time.monotonic() - t0 < 3
        with pytest.raises(EngineDeadError, match="recover"):  # known dead: refused at once, no 120 s wait
            llm.generate([PROMPTS[1]], GREEDY)
        eng.recover()
        assert llm.generate([PROMPTS[0]], GREEDY)[0].token_ids == before
        assert eng.stats.recoveries == 1 and eng.stats.cards_restarted == 1


def test_async_callers_get_an_error_when_a_card_dies_and_restart_cards_recovers(shm_prefix):
    async def main(allm, kill):
        async def one():
            async for _ in allm.generate(PROMPTS[0], SamplingParams(max_tokens=2000, temperature=0,
                                                                     ignore_eos=True)):
                pass

        tasks = [asyncio.create_task(one()) for _ in range(3)]
        await asyncio.sleep(0.5)
        kill()
        t0 = time.monotonic()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return results, time.monotonic() - t0

    with AsyncLLM(tensor_parallel_size=2, shm_prefix=shm_prefix, progress=False, restart_cards=True,
                  max_model_len=4096, num_kv_blocks=1024) as allm:
        results, took = asyncio.run(main(allm, lambda: allm.engine.cluster.kill(0)))
        assert all(isinstance(r, EngineError) for r in results) and took < 2.0, (results, took)
        deadline = time.monotonic() + 30
        while not allm.health()["ok"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert allm.health()["ok"] and allm.engine.stats.cards_restarted == 1

        async def again():
            return [t async for out in allm.generate(PROMPTS[0], GREEDY) for t in out.token_ids]

        assert asyncio.run(again()) == asyncio.run(again())
