"""Phantom cards: the same emulated time as real ones, at a fraction of the host's cost."""
from __future__ import annotations

import pytest

from devices.memory import OutOfDeviceMemory
from rsd_runtime.llm import LLM
from rsd_runtime.sampling import SamplingParams
from rsd_runtime.tiny_model import ensure_tiny_model

PROMPTS = [[0, 5, 17, 42, 7, 99], [0, 8], list(range(1, 40))]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_phantom_step_times_equal_real_ones(tp, shm_prefix):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    times = {}
    for phantom in (False, True):
        with LLM(model=str(ensure_tiny_model()), tensor_parallel_size=tp, phantom=phantom, shm_prefix=shm_prefix,
                 progress=False, chunk_size=16) as llm:
            times[phantom] = []
            llm.engine.on_step = lambda ns, batch: times[phantom].append(ns)
            outs = llm.generate(PROMPTS, params)
            assert all(len(o.token_ids) == 6 for o in outs)
            status = llm.engine.cluster.status()
            if phantom:
                assert all(row["phantom"] and row["memory_used"] > 0 for row in status)
    assert len(times[False]) > 3 and times[True] == times[False]


def test_phantom_preset_too_big_for_the_card_is_refused(shm_prefix):
    with pytest.raises(OutOfDeviceMemory, match=r"card 0: the weights of this model at tp=1 need .* per card; "
                                                 r"atom-plus has 16.00 GiB \(missing"):
        LLM(model="llama3-70b", tensor_parallel_size=1, phantom=True, shm_prefix=shm_prefix, progress=False)
    with pytest.raises(OutOfDeviceMemory, match=r"card 0: 100000 KV blocks need .* \(missing"):
        LLM(model="llama3-8b", tensor_parallel_size=4, phantom=True, num_kv_blocks=100_000, shm_prefix=shm_prefix,
            progress=False)


def test_real_weights_are_needed_without_phantom(shm_prefix):
    with pytest.raises(ValueError, match="shape preset without weights"):
        LLM(model="llama3-8b", tensor_parallel_size=4, shm_prefix=shm_prefix, progress=False)


def test_interpolated_decode_equals_every_step_run(shm_prefix):
    from rsd_runtime.perf import PerfRunner, batch_timing

    with PerfRunner("llama3-8b", tp=2, instances=1, shm_prefix=shm_prefix) as runner:
        sampled = batch_timing(runner, 4, 300, 24, decode_samples=4)
        exact = batch_timing(runner, 4, 300, 24, decode_samples=0)
        assert runner.steps_run == 1 + 23  # the prefill and each of the 23 decode steps once: repeats are not rerun
    assert sampled.total_ns == exact.total_ns and sampled.tpot_ns == exact.tpot_ns
