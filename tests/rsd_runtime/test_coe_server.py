"""rsd-launch serve --models: every model listed, an unknown one refused with 404, a switch in the TTFT;
and the bad inputs of a pool of experts, refused before any card starts."""
from __future__ import annotations

import dataclasses

import httpx
import pytest

from devices.spec import GiB, get_spec
from devices.tiers import OutOfTierMemory
from rsd_runtime.coe import switch_path
from rsd_runtime.coe_engine import CoEEngine, UnknownModel
from rsd_runtime.coe_router import RouterConfig
from rsd_runtime.deploy import shard_bytes
from rsd_runtime.model_config import get_model_preset
from rsd_runtime.sampling import SamplingParams
from rsd_runtime.server.launch import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Two Llama-2-7B-shaped experts on one phantom SN40L socket (no torch, no bytes: a quick start)."""
    with ServerProcess(tp=1, phantom=True, extra_args=["--device", "sn40l", "--models", "a=llama2-7b",
                                                       "b=llama2-7b"]) as srv:
        yield srv


def test_models_are_listed_and_an_unknown_one_is_404(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["a", "b"]
        r = c.post("/v1/completions", json={"model": "zz", "prompt": [1, 2, 3], "max_tokens": 2})
        assert r.status_code == 404
        err = r.json()["error"]
        assert err["param"] == "model" and "the model 'zz' does not exist; this server serves 'a', 'b'" in err["message"]


def test_a_request_for_an_inactive_expert_waits_for_its_switch(server):
    body = {"prompt": list(range(1, 33)), "max_tokens": 4, "ignore_eos": True}
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        ttft = {}
        for n, model in enumerate("abb"):
            r = c.post("/v1/completions", json={**body, "model": model})
            assert r.status_code == 200 and r.json()["model"] == model
            ttft[n] = r.json()["choices"][0]["timings"]["emu_ttft_s"]
    nbytes = shard_bytes(get_model_preset("llama2-7b"), 1, 2)
    copy_ns = -(-nbytes // 100)  # SN40L DDR at 100 GB/s: 100 bytes a nanosecond
    assert round((ttft[1] - ttft[2]) * 1e9) == copy_ns  # b's first request paid the copy, its second did not


def test_bad_input_is_refused_before_any_card_starts(tmp_path):
    sn40l, atom = get_spec("sn40l"), get_spec("atom-plus")
    with pytest.raises(OutOfTierMemory, match=r"expert 'big' needs .* more than the device tier of atom-plus holds "
                                              r"on its own"):
        CoEEngine({"big": "llama3-8b"}, 1, device=dataclasses.replace(atom, memory_bytes=8 * GiB), phantom=True)
    with pytest.raises(ValueError, match=r"atom-plus has no memory tier 'ddr'; its tiers: sram, device"):
        CoEEngine({"a": "llama2-7b"}, 1, device=atom, staging="ddr", phantom=True)
    with pytest.raises(OutOfTierMemory, match=r"the ddr tier cannot hold .* for expert 'e\d+'"):
        CoEEngine({f"e{i}": "llama2-7b" for i in range(130)}, 1, device=sn40l, phantom=True)  # 1.5 TiB: 122
    router = tmp_path / "router.toml"
    router.write_text('default = "a"\n')
    with pytest.raises(ValueError, match=r"experts 'a' \(vocabulary 32000\) and 'b' \(vocabulary 128256\) cannot "
                                         r"share router 'coe': a router reads one vocabulary"):
        CoEEngine({"a": "llama2-7b", "b": "llama3-8b"}, 1, device=sn40l, phantom=True, router=str(router))
    router.write_text('default = "z"\n')
    with pytest.raises(ValueError, match=r"router 'coe' names experts this engine does not serve: \['z'\]"):
        CoEEngine({"a": "llama2-7b"}, 1, device=sn40l, phantom=True, router=str(router))


def test_the_sim_backend_switches_on_the_emulated_clock_alone():
    engine = CoEEngine({"a": "llama2-7b", "b": "llama2-7b"}, 8, device="atom-plus", phantom=True, backend="sim",
                       progress=False)
    with pytest.raises(UnknownModel, match=r"the model 'c' does not exist"):
        engine.add_request(0, [1, 2, 3], model="c")
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for i, m in enumerate("abab"):
        engine.add_request(i, [1, 2, 3], params, model=m)
    while engine.has_unfinished():
        engine.step()
    # no DDR on an ATOM+ card: each switch reads host memory, the switch's uplink shared by 8 cards
    copy = switch_path(get_spec("atom-plus"), num_cards=8).copy_ns(shard_bytes(get_model_preset("llama2-7b"), 8, 2))
    assert engine.switch_stats() == {"switches": 2, "hits": 2, "emu_switch_s": 2 * copy * 1e-9}
    assert [s.expert for s in engine.switches] == list("abab")


def test_router_rules_from_toml(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('name = "mix"\ndefault = "g"\n[[rule]]\nexpert = "code"\ncontains = ["def ", "import"]\n'
                    '[[rule]]\nexpert = "math"\ntoken_ids = [7]\n')
    r = RouterConfig.from_toml(path)
    assert r.name == "mix"
    assert [r.by_rules(t, ids) or r.default for t, ids in
            [("def f(): pass", [1]), ("2 + 2", [5, 7]), ("import os", [7]), ("hello", [1])]] == \
        ["code", "math", "code", "g"]
    path.write_text('[[rule]]\nexpert = "a"\n')
    with pytest.raises(ValueError, match=r"rule 0 needs 'expert' and 'contains' or 'token_ids'"):
        RouterConfig.from_toml(path)
    path.write_text('[[rule]]\nexpert = "a"\ncontains = ["x"]\n')
    with pytest.raises(ValueError, match=r"give a 'default' expert or a \[classifier\]"):
        RouterConfig.from_toml(path)


@pytest.mark.parametrize("args,message", [
    (["--models", "x", "--phantom"], "--models takes NAME=PATH items, got 'x'"),
    (["--router", "r.toml"], "--router goes with --models"),
])
def test_serve_options_are_checked(args, message, shm_prefix):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "rsd_runtime.cli", "--shm-prefix", shm_prefix, "serve", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
