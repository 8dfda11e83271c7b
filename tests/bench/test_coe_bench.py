"""bench.coe: the switching and footprint records against figures worked by hand."""
from __future__ import annotations

import json

import pytest

from bench import coe
from rsd_runtime.deploy import shard_bytes
from rsd_runtime.model_config import get_model_preset


def test_switching_records(tmp_path, capsys):
    out = tmp_path / "coe.json"
    assert coe.main(["--switching", "--model", "llama2-7b", "--json", str(out)]) == 0
    records = {r["device"]: r for r in json.loads(out.read_text())["records"]}
    nbytes = shard_bytes(get_model_preset("llama2-7b"), 8, 2)
    assert {r["bytes"] for r in records.values()} == {nbytes}
    assert set(records["sn40l-node"]) == {"device", "model", "num_cards", "bytes", "emu_switch_s", "path"}
    # SN40L: each socket reads its own DDR at 100 GB/s
    assert records["sn40l-node"]["emu_switch_s"] == -(-nbytes // 100) / 1e9
    # DGX H100: each GPU on its own Gen5 x16 (55.45 GB/s), root complex 500 ns + one 350 ns hop
    assert records["dgx-h100"]["emu_switch_s"] == (850 + -(-nbytes * 20 // 1109)) / 1e9
    # ATOM+ server: eight cards share the switch's uplink, so each gets an eighth of it
    assert records["atom-plus-server"]["emu_switch_s"] == (1200 + -(-8 * nbytes * 20 // 1109)) / 1e9
    assert "sn40l-node" in capsys.readouterr().out


def test_footprint_with_and_without_ddr():
    records = coe.footprint("llama2-7b", 150, "bfloat16")
    sn40l = {r["tier"]: r["num_cards"] for r in records if r["device"] == "sn40l-node"}
    total = shard_bytes(get_model_preset("llama2-7b"), 1, 2)
    assert sn40l["ddr"] == -(-150 * total // (1536 << 30))  # 150 experts in 1.5 TiB sockets: 2
    assert sn40l["device memory"] == -(-150 * total // int((64 << 30) * 0.9))
    assert sn40l["ddr"] < sn40l["device memory"]


def test_bad_options():
    with pytest.raises(SystemExit):
        coe.main(["--switching", "--footprint"])
    with pytest.raises(ValueError, match="unknown model preset 'gpt9'"):
        coe.main(["--switching", "--model", "gpt9"])
    with pytest.raises(SystemExit):
        coe.main(["--replay", "--request-rate", "0"])


def test_replay_with_and_without_ddr(tmp_path, capsys):
    out = tmp_path / "replay.json"
    argv = ["--replay", "--device", "sn40l", "--num-experts", "4", "--model", "llama2-7b", "--num-prompts", "16",
            "--input-len", "16", "--output-len", "4", "--request-rate", "20", "--seed", "3", "--json", str(out)]
    assert coe.main(argv) == 0
    ddr, host = json.loads(out.read_text())["records"]
    assert (ddr["device"], host["device"]) == ("sn40l", "sn40l-no-ddr")
    assert (ddr["clock"], ddr["completed"], ddr["staging"], host["staging"]) == ("emulated", 16, "ddr", "host")
    nbytes = shard_bytes(get_model_preset("llama2-7b"), 8, 2)
    # every copy moves one expert: switches x the hand figures of test_switching_records
    assert ddr["emu_switch_s"] == pytest.approx(ddr["switches"] * -(-nbytes // 100) / 1e9, abs=1e-12)
    assert host["emu_switch_s"] == pytest.approx(host["switches"] * (1200 + -(-8 * nbytes * 20 // 1109)) / 1e9,
                                                 abs=1e-12)
    assert 4 >= ddr["switches"] >= 2 and ddr["mean_ttft_ms"] < host["mean_ttft_ms"]
    assert "sn40l-no-ddr" in capsys.readouterr().out
    assert coe.main(argv) == 0  # the same seed gives the same figures
    again = json.loads(out.read_text())["records"][0]
    assert {**again, "wall_s": 0} == {**ddr, "wall_s": 0}
