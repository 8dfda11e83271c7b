"""Injected faults: kills and pauses at a step, degraded links, and the engine carrying on after them."""
from __future__ import annotations

import time

import pytest

from conftest import assert_no_leaks
from devices.faults import FaultError, FaultPlan
from interconnect.emulation import _cost
from interconnect.links import LinkDegradation
from rsd_runtime import Cluster, ClusterError
from rsd_runtime.engine import EngineDeadError
from rsd_runtime.llm import LLM
from rsd_runtime.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def llm(shm_prefix):
    with LLM(tensor_parallel_size=2, shm_prefix=shm_prefix, progress=False, heartbeat_timeout=3.0) as llm:
        yield llm
    assert_no_leaks()


@pytest.fixture(scope="module")
def reference(llm):
    return llm.generate([PROMPT], GREEDY)[0].token_ids


@pytest.mark.restarts_cards
def test_kill_at_step_k_fails_that_step_and_recover_restores_the_tokens(llm, reference):
    eng = llm.engine
    steps = eng.stats.steps
    assert eng.cluster.inject(1, "kill", at_step=3) >= 3
    with pytest.raises(EngineDeadError, match=r"card 1 .*SIGKILL"):
        llm.generate([PROMPT], GREEDY)
    assert eng.stats.steps == steps + 2  # two steps ran, the third met the kill
    eng.recover()
    assert llm.generate([PROMPT], GREEDY)[0].token_ids == reference


def test_a_short_pause_only_costs_wall_time(llm, reference):
    llm.engine.cluster.inject(0, "pause", at_step=2, seconds=1.0)
    t0 = time.monotonic()
    assert llm.generate([PROMPT], GREEDY)[0].token_ids == reference
    assert time.monotonic() - t0 >= 1.0
    llm.engine.cluster.check()


@pytest.mark.restarts_cards
def test_a_pause_past_the_heartbeat_timeout_is_a_hung_card_and_recovers(llm, reference):
    eng = llm.engine
    eng.cluster.inject(1, "pause", at_step=1, seconds=8.0)
    with pytest.raises(EngineDeadError, match="card 1 .*sent no heartbeat"):
        llm.generate([PROMPT], GREEDY)
    eng.recover()  # the hung card is ended and started again
    assert llm.generate([PROMPT], GREEDY)[0].token_ids == reference


@pytest.mark.parametrize("bad, named", [
    (dict(card=0, kind="explode"), "unknown card fault 'explode'"),
    (dict(card=0, kind="kill", at_step=0), "step must be an int >= 1"),
    (dict(card=0, kind="pause", seconds=-1), "seconds must be in"),
    (dict(card=9, kind="kill"), "no card 9"),
])
def test_bad_injections_are_refused_by_name(llm, bad, named):
    card = bad.pop("card")
    with pytest.raises((FaultError, ClusterError), match=named):
        llm.engine.cluster.inject(card, bad.pop("kind"), **bad)


def test_a_degraded_link_changes_emulated_time_exactly_as_the_link_model_says(shm_prefix):
    count = 1024  # float32: one message from card 0 to card 1
    fault = LinkDegradation(bw_factor=0.3, added_latency_ns=1234, from_ns=0)
    with Cluster(num_devices=2, shm_prefix=shm_prefix) as cluster:
        base = cluster.bench_collective("broadcast", count, warmup=0, iters=1)["emu_ns"]
        occ, lat = _cost(cluster.topology, 0, 1, count * 4, ())
        cluster.degrade_link(0, 1, LinkDegradation(0.3, 1234, from_ns=10 ** 12))  # not yet in force
        assert cluster.bench_collective("broadcast", count, warmup=0, iters=1)["emu_ns"] == base
        cluster.degrade_link(0, 1, fault)
        got = cluster.bench_collective("broadcast", count, warmup=0, iters=1)["emu_ns"]
        occ2, lat2 = fault.apply(0, occ, lat)
        assert got == base - occ - lat + occ2 + lat2
        assert got > base
        cluster.degrade_link(1, 0, fault)  # the other direction is its own link: broadcast from 0 unchanged
        assert cluster.bench_collective("broadcast", count, warmup=0, iters=1)["emu_ns"] == got


def test_fault_plans_parse_and_name_their_errors():
    plan = FaultPlan.parse(["kill:card=2:step=5", "pause:card=1:step=3:seconds=1",
                            "link:src=0:dst=1:bw=0.5:lat_us=2:from_ns=0"])
    assert [(f.kind, f.card, f.at_step, f.seconds) for f in plan.cards] == [("kill", 2, 5, 0.0), ("pause", 1, 3, 1.0)]
    assert plan.links[0].degradation == LinkDegradation(0.5, 2000, 0)
    for spec, named in [("kill:step=5", "kill needs card="), ("link:src=0:dst=1:bw=2", "bw_factor must be in"),
                        ("boom:card=1", "unknown fault 'boom'"), ("pause:card=1:step=x", "step='x'"),
                        ("kill:card=1:colour=red", "not colour"), ("kill:card", "'card' is not key=value")]:
        with pytest.raises(FaultError, match=named):
            FaultPlan.parse([spec])


def test_phantom_clusters_refuse_link_faults(shm_prefix):
    with Cluster(num_devices=2, shm_prefix=shm_prefix, phantom=True) as cluster:
        with pytest.raises(ClusterError, match="phantom"):
            cluster.degrade_link(0, 1, LinkDegradation(0.5))
