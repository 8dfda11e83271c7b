"""Compiler choices (fusion, overlap) and host costs: real cards, phantom cards and the simulation agree,
the values do not change, overlap never slows a step, and the figures repeat."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from rsd_runtime.breakdown import step_breakdown
from rsd_runtime.engine import LLMEngine
from rsd_runtime.host_spec import HOSTS
from rsd_runtime.sampling import SamplingParams
from rsd_runtime.tiny_model import ensure_tiny_model
from rsd_runtime.trace import Trace

PROMPTS = [[0, 5, 17, 42, 7, 99], [0, 8], list(range(1, 40))]
PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
# (fusion, overlap, host overhead): every fusion with every schedule (unchunked, forced chunks, the priced
# choice) and host costs off, serialised and async
COMBOS = [*itertools.product(("none", "ops", "layer"), ("off", 2), ("off", "xeon-python-async")),
          ("none", 3, "on"), ("ops", "on", "off"), ("layer", "on", "on")]


def run(engine: LLMEngine, prompts=PROMPTS, params=PARAMS) -> tuple[list[int], list[list[int]]]:
    """(emulated ns of every step, the tokens of every prompt)."""
    steps, tokens = [], {}
    engine.on_step = lambda ns, batch: steps.append(ns)
    for i, p in enumerate(prompts):
        engine.add_request(i, p, params)
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return steps, [tokens[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def module_cluster(shm_prefix):
    """A real and a phantom instance of the tiny model at tp=2, options changed between tests."""
    kw = dict(progress=False, chunk_size=16, dtype="float32", num_kv_blocks=64, shm_prefix=shm_prefix)
    real = LLMEngine(str(ensure_tiny_model()), 2, **kw)
    try:
        phantom = LLMEngine(str(ensure_tiny_model()), 2, phantom=True, **kw)
    except BaseException:
        real.close()
        raise
    try:
        yield real, phantom
    finally:
        real.close()
        phantom.close()


def test_real_and_phantom_cards_charge_the_same_for_every_option(module_cluster):
    real, phantom = engines = module_cluster
    base = None
    for fusion, overlap, host in COMBOS:
        for e in engines:
            e.set_options(fusion=fusion, overlap=overlap, host_overhead=host)
        got, tokens = run(real)
        assert run(phantom)[0] == got, (fusion, overlap, host)
        if base is None:
            base = tokens
        assert tokens == base  # the schedule changes, the values do not
    # forced chunks really cut the steps: the logits of a pipelined prefill equal the plain one's
    real.set_options(fusion="none", overlap="off", host_overhead="off")
    t0 = real.emu_now
    plain = real.prefill_logits(PROMPTS[2])
    t1 = real.emu_now
    real.set_options(overlap=4)
    torch.testing.assert_close(real.prefill_logits(PROMPTS[2]), plain, rtol=0, atol=1e-4)
    assert real.emu_now - t1 != t1 - t0  # four chunks: another schedule, the same logits
    real.set_options(overlap="off")


def test_host_costs_per_step_by_hand(module_cluster):
    _, phantom = module_cluster
    phantom.set_options(fusion="none", overlap="off", host_overhead="off")
    bare, _ = run(phantom, PROMPTS[:1])
    phantom.set_options(host_overhead="on")
    host = HOSTS["xeon-python"]
    charged, _ = run(phantom, PROMPTS[:1])
    # one request of 6 tokens, chunk 16: a prefill step, then 3 decode steps; one sequence each
    extra = [1_000_000 + 15_000 + 2_000_000 + 20_000 + 10_000] + [1_000_000 + 15_000 + 20_000 + 10_000] * 3
    assert host.prepare_ns(1, 1) + host.sample_ns + host.detok_ns == extra[0] == 3_045_000
    assert [c - b for c, b in zip(charged, bare)] == extra
    phantom.set_options(host_overhead="xeon-python-async")
    overlapped, _ = run(phantom, PROMPTS[:1])
    # async: the first step as serialised but for the detokenising (in the API server's process); then
    # step i starts max(step i-1's cards + its sampling, its own 1.015 ms preparation) after step i-1 did
    assert overlapped[0] == bare[0] + 3_045_000 - 10_000
    for i in range(1, 4):
        assert overlapped[i] == max(bare[i - 1] + 20_000, 1_015_000) + bare[i] - bare[i - 1]
    assert sum(overlapped) < sum(charged)
    phantom.set_options(host_overhead="off")


def test_trace_of_real_cards_matches_their_steps(module_cluster):
    real, _ = module_cluster
    real.set_options(fusion="layer", overlap=2, host_overhead="off")
    trace, devices = Trace(), []
    real.start_trace(trace)
    real.on_step = lambda ns, batch: devices.append(real.last_device_ns)
    for i, p in enumerate(PROMPTS):
        real.add_request(i, p, PARAMS)
    while real.has_unfinished():
        real.step()
    real.trace = None
    steps = [e for e in trace.events if e["ph"] == "X" and e["pid"] == 0]
    assert len(steps) == len(devices) > 3 and [round(e["dur"] * 1000) for e in steps] == devices
    real.set_options(fusion="none", overlap="off")


def sim(model: str, tp: int, **kw) -> LLMEngine:
    return LLMEngine(model, tp, phantom=True, backend="sim", progress=False, num_kv_blocks=512,
                     max_num_batched_tokens=2048, chunk_size=2048, **kw)


def test_overlap_never_slows_a_step_and_hides_communication():
    prompts = [list(range(1, 1500)), list(range(3, 700))]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for fusion in ("none", "layer"):
        off, _ = run(sim("llama3-8b", 4, fusion=fusion), prompts, params)
        on, _ = run(sim("llama3-8b", 4, fusion=fusion, overlap="on"), prompts, params)
        assert len(on) == len(off) and all(a <= b for a, b in zip(on, off)) and on[0] < off[0]
    for seqs in ([(1024, 0)], [(1, 1000)] * 8):
        a = step_breakdown(sim("llama3-8b", 4), seqs)
        b = step_breakdown(sim("llama3-8b", 4, overlap="on"), seqs)
        assert b.step_ns <= a.step_ns and b.exposed_ns <= a.exposed_ns
        assert a.hidden_ns == 0 and a.chunks == 1  # without overlap nothing hides
    assert b.chunks == 1 or b.step_ns < a.step_ns


def test_figures_repeat_and_the_trace_adds_up(tmp_path):
    def once(trace=None):
        e = sim(str(ensure_tiny_model()), 4, fusion="ops", overlap=2, host_overhead="on")
        if trace is not None:
            e.start_trace(trace)
        devices = []
        e.on_step = lambda ns, batch: devices.append(e.last_device_ns)
        for i, p in enumerate(PROMPTS):
            e.add_request(i, p, PARAMS)
        while e.has_unfinished():
            e.step()
        return devices

    trace = Trace()
    first = once(trace)
    assert once() == first
    path = tmp_path / "t.json"
    trace.write(str(path))
    doc = json.loads(path.read_text())
    ev = doc["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {names[(1 + c, 1)] for c in range(4)} == {"compute"} and names[(1, 2)] == "data movement"
    spans = [e for e in ev if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and isinstance(e["ts"], float) for e in spans)
    steps = [e for e in spans if e["pid"] == 0 and e["tid"] == 1]
    assert [round(e["dur"] * 1000) for e in steps] == first
    for k, step in enumerate(steps):  # each step's card spans fill it: the slowest card ends it
        mine = [e for e in spans if e["pid"] > 0 and e["args"]["step"] == k]
        assert min(e["ts"] for e in mine) == pytest.approx(step["ts"])
        assert max(e["ts"] + e["dur"] for e in mine) == pytest.approx(step["ts"] + step["dur"])
        for card in range(4):  # one engine at a time per track
            track = sorted((e["ts"], e["ts"] + e["dur"]) for e in mine if e["pid"] == 1 + card and e["tid"] == 1)
            assert all(a[1] <= b[0] + 1e-6 for a, b in zip(track, track[1:]))
    ops = [e for e in spans if e["pid"] > 0 and e["tid"] == 1]
    assert all(e["args"]["bytes"] > 0 for e in ops) and any(e["args"]["flops"] > 0 for e in ops)
    colls = [e for e in spans if e["pid"] > 0 and e["tid"] == 2]
    assert colls and all(e["args"]["bytes"] > 0 for e in colls)
    flows = [e for e in ev if e["ph"] in "sf"]
    assert len(flows) == 2 * len(colls) and {e["ph"] for e in flows} == {"s", "f"}
    host = [e for e in spans if e["pid"] == 0 and e["tid"] > 1]
    assert {e["name"] for e in host} == {"prepare", "sample", "detokenise"}
