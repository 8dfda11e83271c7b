"""The in-process instance (backend="sim") gives the phantom cards' emulated figures, step by step."""
from __future__ import annotations

import random

import pytest

from rsd_runtime.engine import LLMEngine
from rsd_runtime.sampling import SamplingParams
from rsd_runtime.tiny_model import ensure_tiny_model


def workload(seed: int, n: int):
    rng = random.Random(seed)
    return [([rng.randrange(1, 500) for _ in range(rng.randint(3, 70))],
             SamplingParams(max_tokens=rng.randint(1, 12), temperature=0, ignore_eos=True)) for _ in range(n)]


def run(engine: LLMEngine, reqs, arrivals_every: int = 3) -> list[tuple[int, int]]:
    """Requests join every few steps (continuous batching); (step ns, end clock) of every step."""
    steps = []
    engine.on_step = lambda ns, batch: steps.append((ns, engine.emu_now))
    pending = list(enumerate(reqs))
    k = 0
    while pending or engine.has_unfinished():
        if pending and k % arrivals_every == 0:
            i, (prompt, params) = pending.pop(0)
            engine.add_request(i, prompt, params)
        engine.step()
        k += 1
    return steps


@pytest.mark.parametrize("model,tp,topology", [("tiny", 2, "switch"), ("tiny", 4, "switch-tree"),
                                               ("llama3-8b", 4, "host-staged")])
def test_sim_backend_equals_phantom_cards_every_step(model, tp, topology, shm_prefix):
    path = str(ensure_tiny_model()) if model == "tiny" else model
    kw = dict(phantom=True, progress=False, chunk_size=32, max_num_batched_tokens=64, max_num_seqs=4,
              topology=topology, num_kv_blocks=256)
    reqs = workload(tp, 10)
    cards = LLMEngine(path, tp, shm_prefix=shm_prefix, **kw)
    try:
        want = run(cards, reqs)
    finally:
        cards.close()
    sim = LLMEngine(path, tp, backend="sim", **kw)
    got = run(sim, reqs)
    assert len(want) > 20 and got == want


def test_sim_backend_refuses_real_weights():
    with pytest.raises(ValueError, match="phantom instances only"):
        LLMEngine(str(ensure_tiny_model()), 2, backend="sim", progress=False)
