"""Scheduler and block manager alone: chunked prefill, continuous batching, budgets, preemption, stops.

A fake KV cache stands in for the cards: it writes each fed token at the slot
its block table names and computes the next token from what it reads back, so
a wrong block table, a block shared by two sequences or a bad recompute after
preemption changes the outputs.
"""
from __future__ import annotations

import pytest

from rsd_runtime.block_manager import BlockManager, OutOfBlocks
from rsd_runtime.sampling import SamplingParams
from rsd_runtime.scheduler import Batch, Scheduler
from rsd_runtime.sequence import Sequence, SeqStatus
from rsd_runtime.stopping import token_stop

VOCAB = 1000
NO_LIMIT = 1 << 30


def next_token(token_ids: list[int]) -> int:
    """The fake model: a hash of the whole history, never 0 (kept as an eos id for the tests that want one)."""
    h = 0
    for t in token_ids:
        h = (h * 1_000_003 + t + 1) % 2_147_483_647
    return 1 + h % (VOCAB - 1)


def reference_output(prompt_ids: list[int], num_tokens: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(num_tokens):
        ids.append(next_token(ids))
    return ids[len(prompt_ids):]


class FakeCache:
    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.slots: list[tuple[int, int] | None] = [None] * bm.num_blocks * bm.block_size  # (seq_id, token)

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.bm.block_size] * self.bm.block_size + pos % self.bm.block_size

    def run(self, batch: Batch) -> dict[int, int]:
        sampled = {}
        for s in batch.seqs:
            for pos, token in zip(s.positions, s.token_ids):
                self.slots[self.slot(s.seq, pos)] = (s.seq.seq_id, token)
            if s.sample:
                history = [self.slots[self.slot(s.seq, pos)] for pos in range(s.start + s.num_tokens)]
                assert all(h is not None and h[0] == s.seq.seq_id for h in history), \
                    f"seq {s.seq.seq_id} read a slot another sequence wrote"
                sampled[s.seq.seq_id] = next_token([h[1] for h in history])
        return sampled


def check_invariants(sched: Scheduler, batch: Batch) -> None:
    bm = sched.block_manager
    assert batch.num_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    assert all(1 <= s.num_tokens <= sched.chunk_size for s in batch.seqs)
    assert len({id(s.seq) for s in batch.seqs}) == len(batch.seqs)
    held = [b for seq in sched.running for b in seq.block_table]
    assert len(held) == len(set(held)), "a block is in two block tables"
    assert all(bm.owner(b) == seq.seq_id for seq in sched.running for b in seq.block_table)
    assert not any(seq.block_table for seq in sched.waiting)
    assert len(held) + bm.num_free_blocks == bm.num_blocks
    for s in batch.seqs:
        assert len(s.seq.block_table) == -(-(s.start + s.num_tokens) // bm.block_size)


def post(sched: Scheduler, batch: Batch, sampled: dict, eos_ids=(), max_model_len: int = NO_LIMIT) -> list[Sequence]:
    """What the engine does after a step: the scheduler appends the tokens, the stop rules finish sequences."""
    sched.postprocess(batch, sampled)
    max_len = min(max_model_len, sched.max_len)
    finished = []
    for s in batch.seqs:
        if s.sample and not s.seq.is_finished:
            reason = token_stop(s.seq, s.seq.output_ids[-1], set(eos_ids), max_len)
            if reason is not None:
                sched.finish(s.seq, reason)
                finished.append(s.seq)
    return finished


def drive(sched: Scheduler, cache: FakeCache | None = None, *, eos_ids: frozenset[int] = frozenset(),
          max_model_len: int = NO_LIMIT, max_steps: int = 10_000) -> list[Batch]:
    """Run to completion with the fake cache (pass the one earlier steps wrote); every batch, checked."""
    cache = cache or FakeCache(sched.block_manager)
    batches = []
    while sched.has_unfinished():
        assert len(batches) < max_steps, "no progress"
        batch = sched.schedule()
        check_invariants(sched, batch)
        post(sched, batch, cache.run(batch), eos_ids, max_model_len)
        batches.append(batch)
    assert sched.schedule() is None
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    return batches


def make_seq(seq_id: int, num_prompt: int, max_tokens: int = 4, **params) -> Sequence:
    prompt = [(seq_id * 7919 + i * 31) % VOCAB for i in range(num_prompt)]
    return Sequence(seq_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, **params))


def chunks(batch: Batch) -> list[tuple[int, int, int, bool]]:
    return [(s.seq.seq_id, s.start, s.num_tokens, s.sample) for s in batch.seqs]


def test_chunked_prefill_spreads_a_long_prompt_over_steps():
    bm = BlockManager(100, 16)
    sched = Scheduler(bm, max_num_batched_tokens=512, chunk_size=256)
    seq = make_seq(0, 600, max_tokens=3)
    sched.add(seq)
    cache = FakeCache(bm)
    expected = [((0, 0, 256, False), 16), ((0, 256, 256, False), 32), ((0, 512, 88, True), 38),
                ((0, 600, 1, True), 38), ((0, 601, 1, True), 38)]
    for want, num_blocks in expected:
        batch = sched.schedule()
        assert chunks(batch) == [want]
        assert len(seq.block_table) == num_blocks
        post(sched, batch, cache.run(batch))
    assert seq.finish_reason == "length" and seq.output_ids == reference_output(seq.prompt_ids, 3)
    assert not sched.has_unfinished() and bm.num_free_blocks == 100


def test_new_sequences_join_while_others_decode():
    bm = BlockManager(64, 8)
    sched = Scheduler(bm, max_num_batched_tokens=64, chunk_size=32)
    cache = FakeCache(bm)
    a = make_seq(0, 10, max_tokens=8)
    sched.add(a)

    def step():
        batch = sched.schedule()
        check_invariants(sched, batch)
        post(sched, batch, cache.run(batch))
        return chunks(batch)

    assert step() == [(0, 0, 10, True)]
    assert step() == [(0, 10, 1, True)]
    b = make_seq(1, 40, max_tokens=3)
    sched.add(b)
    assert step() == [(0, 11, 1, True), (1, 0, 32, False)]
    assert step() == [(0, 12, 1, True), (1, 32, 8, True)]
    assert step() == [(0, 13, 1, True), (1, 40, 1, True)]
    drive(sched, cache)
    assert a.output_ids == reference_output(a.prompt_ids, 8)
    assert b.output_ids == reference_output(b.prompt_ids, 3)


def test_token_budget_and_seq_limit_hold_under_load():
    bm = BlockManager(200, 4)
    sched = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=64, chunk_size=32)
    seqs = [make_seq(i, 50 + 3 * i, max_tokens=5) for i in range(7)]
    for seq in seqs:
        sched.add(seq)
    batches = drive(sched)
    assert max(b.num_tokens for b in batches) == 64, "the budget should bind while prompts queue"
    assert max(len(b.seqs) for b in batches) == 3
    # Every prompt was too long for one chunk, so each was fed over at least two steps.
    for seq in seqs:
        prefill = [s for b in batches for s in b.seqs if s.seq is seq and s.start < seq.num_prompt_tokens]
        assert len(prefill) >= 2 and sum(s.num_tokens for s in prefill) == seq.num_prompt_tokens
        assert seq.output_ids == reference_output(seq.prompt_ids, 5) and seq.finish_reason == "length"


def test_budget_smaller_than_the_running_set_skips_the_rest_this_step():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=2, chunk_size=2)
    seqs = [make_seq(i, 2, max_tokens=6) for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    drive(sched)
    assert all(seq.output_ids == reference_output(seq.prompt_ids, 6) for seq in seqs)


def test_blocks_are_freed_on_finish_and_reused():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm)
    cache = FakeCache(bm)
    a, b = make_seq(0, 8, max_tokens=1), make_seq(1, 12, max_tokens=2)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert chunks(batch) == [(0, 0, 8, True)], "b needs 3 blocks but only 2 are free: it waits"
    a_blocks = list(a.block_table)
    assert b.status is SeqStatus.WAITING and bm.num_free_blocks == 2
    finished = post(sched, batch, cache.run(batch))
    assert finished == [a] and a.block_table == [] and bm.num_free_blocks == 4
    batch = sched.schedule()
    assert chunks(batch) == [(1, 0, 12, True)]
    assert set(b.block_table) & set(a_blocks)
    post(sched, batch, cache.run(batch))
    drive(sched, cache)
    assert b.output_ids == reference_output(b.prompt_ids, 2)


def test_preemption_frees_the_newest_and_recomputes_it():
    bm = BlockManager(4, 2)
    sched = Scheduler(bm)
    cache = FakeCache(bm)
    a, b = make_seq(0, 3, max_tokens=3), make_seq(1, 3, max_tokens=4)
    sched.add(a)
    sched.add(b)

    def step() -> Batch:
        batch = sched.schedule()
        check_invariants(sched, batch)
        post(sched, batch, cache.run(batch))
        return batch

    assert chunks(step()) == [(0, 0, 3, True), (1, 0, 3, True)]
    assert chunks(step()) == [(0, 3, 1, True), (1, 3, 1, True)]
    assert bm.num_free_blocks == 0
    batch = step()  # a's next token needs a third block: b, admitted last, gives its blocks up
    assert chunks(batch) == [(0, 4, 1, True)] and batch.preempted == [b]
    assert a.is_finished and b.status is SeqStatus.WAITING and b.num_preemptions == 1
    assert b.num_cached == 0 and b.block_table == [] and b.num_output_tokens == 2
    assert chunks(step()) == [(1, 0, 5, True)], "recompute prompt + output, then sample the next token"
    drive(sched, cache)
    assert a.output_ids == reference_output(a.prompt_ids, 3)
    assert b.output_ids == reference_output(b.prompt_ids, 4)


def test_preemption_under_pressure_then_everything_completes():
    bm = BlockManager(12, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32, chunk_size=8)
    seqs = [make_seq(i, 6 + 3 * i, max_tokens=20) for i in range(5)]
    for seq in seqs:
        sched.add(seq)
    cache = FakeCache(bm)
    num_preempted = 0
    while sched.has_unfinished():
        running_before = list(sched.running)
        batch = sched.schedule()
        check_invariants(sched, batch)
        if batch.preempted:
            num_preempted += len(batch.preempted)
            # Victims are the most recently admitted, newest first; none of them runs in this step, and
            # nothing is admitted in the step that preempted.
            assert batch.preempted == running_before[::-1][:len(batch.preempted)]
            assert not {id(s.seq) for s in batch.seqs} & {id(v) for v in batch.preempted}
            assert {id(s.seq) for s in batch.seqs} <= {id(seq) for seq in running_before}
            assert list(sched.waiting)[:len(batch.preempted)] == batch.preempted[::-1]
        post(sched, batch, cache.run(batch))
    assert num_preempted >= 2
    for seq in seqs:
        assert seq.finish_reason == "length"
        assert seq.output_ids == reference_output(seq.prompt_ids, 20)
    assert bm.num_free_blocks == 12


def test_sequence_grows_only_to_what_the_cache_holds():
    bm = BlockManager(3, 4)
    sched = Scheduler(bm)
    seq = make_seq(0, 5, max_tokens=100)
    sched.add(seq)
    drive(sched)
    assert seq.finish_reason == "length" and seq.num_tokens == 12


def test_block_manager_bookkeeping():
    bm = BlockManager(5, 4)
    a, b = make_seq(0, 9), make_seq(1, 4)
    assert bm.can_allocate(a, 9) and bm.num_blocks_needed(a, 9) == 3
    bm.allocate(a, 9)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 2
    a.num_cached = 9
    assert bm.num_blocks_needed(a, 3) == 0, "the third block still has room for 3 tokens"
    assert not bm.can_allocate(b, 12)
    with pytest.raises(OutOfBlocks, match="seq 1 needs 3 more KV blocks .* only 2 of 5 are free"):
        bm.allocate(b, 12)
    assert b.block_table == [] and bm.num_free_blocks == 2
    bm.allocate(b, 4)
    assert not set(a.block_table) & set(b.block_table)
    assert [bm.owner(x) for x in a.block_table] == [0, 0, 0] and bm.owner(b.block_table[0]) == 1
    b.block_table.append(a.block_table[0])
    with pytest.raises(RuntimeError, match=r"seq 1 lists blocks \[\d+\] it does not own"):
        bm.free(b)
    b.block_table.pop()
    bm.free(b)
    bm.free(b)  # nothing left to free
    bm.free(a)
    assert bm.num_free_blocks == 5
    with pytest.raises(ValueError, match="num_blocks >= 1"):
        BlockManager(0, 16)


def scripted(sched: Scheduler, seq: Sequence, tokens: list[int], eos_ids=frozenset({0}),
             max_model_len: int = NO_LIMIT) -> list[Sequence]:
    """Feed seq the given sampled tokens one step at a time; what finished."""
    finished = []
    for token in tokens:
        batch = sched.schedule()
        finished += post(sched, batch, {seq.seq_id: token}, eos_ids, max_model_len)
        if seq.is_finished:
            break
    return finished


@pytest.mark.parametrize("params,tokens,max_model_len,reason,num_out", [
    ({"max_tokens": 10}, [5, 6, 0, 7], NO_LIMIT, "eos", 3),
    ({"max_tokens": 5, "ignore_eos": True}, [5, 0, 0, 7, 8, 9], NO_LIMIT, "length", 5),
    ({"max_tokens": 10, "stop_token_ids": [42, 43]}, [5, 43, 7], NO_LIMIT, "stop", 2),
    ({"max_tokens": 3}, [5, 6, 7, 8], NO_LIMIT, "length", 3),
    ({"max_tokens": 10}, [5, 6, 7, 8], 6, "length", 2),  # prompt of 4 + 2 reaches max_model_len
    ({"max_tokens": 2}, [5, 0], NO_LIMIT, "eos", 2),  # the natural stop outranks the length cap
])
def test_stop_conditions(params, tokens, max_model_len, reason, num_out):
    bm = BlockManager(16, 4)
    sched = Scheduler(bm)
    seq = Sequence(0, [1, 2, 3, 4], SamplingParams(temperature=0, **params))
    sched.add(seq)
    finished = scripted(sched, seq, tokens, max_model_len=max_model_len)
    assert finished == [seq] and seq.finish_reason == reason and seq.status is SeqStatus.FINISHED
    assert seq.output_ids == tokens[:num_out]
    assert seq.block_table == [] and bm.num_free_blocks == 16 and not sched.has_unfinished()


def test_engine_finishes_on_a_stop_string_and_can_abort():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm)
    a, b, c = make_seq(0, 4, max_tokens=10), make_seq(1, 4, max_tokens=10), make_seq(2, 4)
    for seq in (a, b, c):
        sched.add(seq)
    batch = sched.schedule()
    post(sched, batch, FakeCache(bm).run(batch))
    sched.finish(a, "stop")  # the engine saw a stop string in a's text
    assert a.finish_reason == "stop" and a.block_table == [] and a not in sched.running
    batch = sched.schedule()
    assert [s.seq for s in batch.seqs] == [b, c]
    sched.finish(b, "abort")  # between schedule and postprocess: postprocess leaves it alone
    post(sched, batch, {c.seq_id: 9})
    assert b.output_ids == [next_token(b.prompt_ids)] and b.finish_reason == "abort"
    sched.finish(b, "stop")
    assert b.finish_reason == "abort", "finishing twice keeps the first reason"
    with pytest.raises(ValueError, match="finish reason must be one of"):
        sched.finish(c, "done")
    assert bm.num_free_blocks == 16 - len(c.block_table)


def test_bad_input_is_refused_clearly():
    bm = BlockManager(2, 4)
    sched = Scheduler(bm)
    with pytest.raises(ValueError, match="whole KV cache holds 8"):
        sched.add(make_seq(0, 9))
    seq = make_seq(1, 3)
    sched.add(seq)
    with pytest.raises(ValueError, match="seq_id 1 is already in the scheduler"):
        sched.add(make_seq(1, 3))
    batch = sched.schedule()
    with pytest.raises(KeyError, match="no token was given"):
        sched.postprocess(batch, {})
    with pytest.raises(ValueError, match="the prompt is empty"):
        Sequence(5, [])
    with pytest.raises(ValueError, match="must be >= 1"):
        Scheduler(bm, chunk_size=0)
    with pytest.raises(ValueError, match="is not in this scheduler"):
        sched.finish(make_seq(7, 2), "abort")


def test_token_ids_slices_prompt_and_output():
    seq = Sequence(0, [1, 2, 3], output_ids=[4, 5])
    for start in range(6):
        for stop in range(start, 6):
            assert seq.token_ids(start, stop) == seq.all_ids[start:stop]
