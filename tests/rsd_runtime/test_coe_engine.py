"""Many experts on the same real cards: exact outputs after switches, LRU eviction on the cards, switch time
in the TTFT, the DDR tier as a segment of its own, and the router's choices (rules and a classifier)."""
from __future__ import annotations

import dataclasses
import stat

import pytest

from devices.shm import SHM_DIR, segment_name
from devices.spec import get_spec
from rsd_runtime.deploy import shard_bytes
from rsd_runtime.llm import LLM
from rsd_runtime.sampling import SamplingParams
from rsd_runtime.tiny_model import ensure_tiny_model
from tests.conftest import assert_no_leaks

GREEDY = SamplingParams(max_tokens=8, temperature=0)
PROMPTS = [[1, 5, 17, 42, 7], [1, 300, 2, 99], [1, 250, 251, 252, 253, 254, 9]]
# Device memory for two tiny experts (3.32 MiB each) beside the KV cache, not three; a DDR tier of
# 64 MiB at 100 GB/s (100 bytes a nanosecond: easy hand figures).
SMALL = dataclasses.replace(get_spec("atom-plus"), name="small-ddr", memory_bytes=8 << 20, ddr_bytes=64 << 20,
                            ddr_bw=100e9)
TP = 1
LABELS = [402, 22, 183]  # the classifier scores expert i by the logit of token LABELS[i]


@pytest.fixture(scope="module")
def paths():
    return {"a": str(ensure_tiny_model()), "b": str(ensure_tiny_model(seed=1)), "c": str(ensure_tiny_model(seed=2))}


@pytest.fixture(scope="module")
def alone(paths, shm_prefix):
    """Each expert run alone on its own cards: its greedy outputs and (for a) the last-position logits."""
    out = {}
    for name, path in paths.items():
        with LLM(path, TP, num_kv_blocks=16, progress=False, shm_prefix=shm_prefix) as llm:
            out[name] = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
            if name == "a":
                out["a_logits"] = [llm.engine.prefill_logits(p)[-1] for p in PROMPTS]
    return out


@pytest.fixture(scope="module")
def coe(paths, shm_prefix, tmp_path_factory):
    router = tmp_path_factory.mktemp("router") / "router.toml"
    router.write_text(f'name = "coe"\n[[rule]]\nexpert = "c"\ntoken_ids = [300]\n'
                      f'[classifier]\nmodel = "{paths["a"]}"\nexperts = ["a", "b", "c"]\nlabel_token_ids = {LABELS}\n')
    llm = LLM(models=paths, tensor_parallel_size=TP, device=SMALL, num_kv_blocks=16, progress=False,
              shm_prefix=shm_prefix, router=str(router))
    llm.generate([PROMPTS[0]], GREEDY, model="a")  # warm-up: the cards' KV caches exist from here on
    yield llm
    llm.close()
    assert_no_leaks()


def test_outputs_exact_after_any_sequence_of_switches(coe, alone):
    engine = coe.engine
    for name in "abacbaa":
        assert [o.token_ids for o in coe.generate(PROMPTS, GREEDY, model=name)] == alone[name], name
    # one call mixing experts: served in arrival order, one expert at a time
    mixed = coe.generate(PROMPTS * 2, GREEDY, model=["b", "b", "c", "a", "c", "b"])
    assert [o.token_ids for o in mixed] == [alone[m][i % 3] for i, m in enumerate("bbcacb")]
    assert engine.pool.num_switches >= 6


def test_lru_eviction_order_on_the_cards(coe):
    engine = coe.engine
    start = len(engine.switches)
    for name in "abca":
        coe.generate([PROMPTS[0]], GREEDY, model=name)
    evicted = [s.evicted for s in engine.switches[start:] if not s.hit]
    resident = list(engine.pool.resident)
    assert resident[-1] == "a" and len(resident) == 2
    assert evicted[-1] == ("b",)  # a came back while c was resident: b was the least recently used
    for card in engine.cards:  # the cards hold exactly the pool's resident experts
        held = {t["name"].split("/")[0] for t in engine.cluster.tensors(card)}
        assert held == set(resident)


def test_a_switch_shows_in_ttft_by_the_bytes_over_ddr(coe, paths):
    engine = coe.engine
    coe.generate([PROMPTS[0]], GREEDY, model="a")
    [hit] = coe.generate([PROMPTS[0]], GREEDY, model="a")  # resident and active: no copy
    coe.generate([PROMPTS[0]], GREEDY, model="b")
    coe.generate([PROMPTS[0]], GREEDY, model="c")  # a is evicted now
    [miss] = coe.generate([PROMPTS[0]], GREEDY, model="a")
    assert engine.switches[-1].expert == "a" and not engine.switches[-1].hit
    nbytes = shard_bytes(engine.engines["a"].cfg, TP, 4)
    assert engine.pool.experts["a"] == nbytes
    # 100 GB/s is 100 bytes per ns: the copy takes ceil(bytes / 100) ns on the emulated clock
    assert round((miss.metrics["emu_ttft_s"] - hit.metrics["emu_ttft_s"]) * 1e9) == -(-nbytes // 100)
    assert miss.metrics["ttft_s"] > 0


def test_the_ddr_tier_is_a_private_segment_of_the_run(coe):
    run = coe.engine.cluster.run_name
    for card in coe.engine.cards:
        seg = SHM_DIR / segment_name(run, card, "ddr")
        st = seg.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == SMALL.ddr_bytes
        assert st.st_blocks * 512 >= 3 * coe.engine.pool.experts["a"] * 0.9  # three experts' bytes written


def test_router_rules_then_classifier(coe, alone):
    engine = coe.engine
    # PROMPTS[1] holds token 300: the rule sends it to c
    assert [o.token_ids for o in coe.generate([PROMPTS[1]], GREEDY, model="coe")] == [alone["c"][1]]
    # the others go to the classifier: the tiny model's logits at LABELS choose a for one, c for the other
    assert [want_for(alone, 0), want_for(alone, 2)] == ["a", "c"]
    for i in (0, 2):
        [out] = coe.generate([PROMPTS[i]], GREEDY, model="coe")
        assert engine.switches[-1].expert == want_for(alone, i)
        assert out.token_ids == alone[want_for(alone, i)][i]
    # the classifier's step is on the emulated clock: routed, the same request waits longer than sent direct
    [direct] = coe.generate([PROMPTS[0]], GREEDY, model=want_for(alone, 0))
    [routed] = coe.generate([PROMPTS[0]], GREEDY, model="coe")
    assert routed.metrics["emu_ttft_s"] > direct.metrics["emu_ttft_s"]


def want_for(alone, i: int) -> str:
    scores = [float(alone["a_logits"][i][t]) for t in LABELS]
    return "abc"[scores.index(max(scores))]


def test_unknown_model_is_refused_and_nothing_queued(coe):
    with pytest.raises(ValueError, match=r"the model 'zz' does not exist; this server serves 'a', 'b', 'c', 'coe'"):
        coe.generate([PROMPTS[0]], GREEDY, model="zz")
    assert not coe.engine.has_unfinished()
