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


def test_replay_repeats_exactly_and_matches_phantom_card_processes(shm_prefix):
    """A small rack replayed twice in process, and once on phantom card processes: every emulated number."""
    from rsd_runtime.replay import Replay, ReplayRequest
    from rsd_runtime.routing import get_policy

    rng = random.Random(5)
    t, reqs = 0, []
    for i in range(14):
        t += int(rng.expovariate(1 / 300_000))  # about one request every 0.3 ms of emulated time
        reqs.append(ReplayRequest(t, [rng.randrange(1, 500) for _ in range(rng.randint(3, 60))], rng.randint(1, 9),
                                  session=f"u{i % 3}"))
    kw = dict(phantom=True, progress=False, chunk_size=32, max_num_batched_tokens=64, max_num_seqs=4,
              num_kv_blocks=128)
    path = str(ensure_tiny_model())

    def rack(**extra):
        return [LLMEngine(path, 2, cards=[2 * i, 2 * i + 1], **kw, **extra) for i in range(3)]

    results = []
    for _ in range(2):
        replay = Replay(rack(backend="sim"), get_policy("least-outstanding"), router_hop_ns=20_000)
        results.append([(r.instance, r.arrival_ns, r.token_ns, r.end_ns) for r in replay.run(reqs)])
    assert results[0] == results[1]
    assert {i for i, *_ in results[0]} == {0, 1, 2} and all(len(tok) >= 1 for _, _, tok, _ in results[0])
    from rsd_runtime.cluster import Cluster

    with Cluster(num_devices=6, phantom=True, shm_prefix=shm_prefix) as cluster:
        replay = Replay(rack(cluster=cluster), get_policy("least-outstanding"), router_hop_ns=20_000)
        on_cards = [(r.instance, r.arrival_ns, r.token_ns, r.end_ns) for r in replay.run(reqs)]
    assert on_cards == results[0]
