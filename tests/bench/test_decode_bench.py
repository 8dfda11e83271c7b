"""bench.decode's phantom mode: a wall time per decode step for each tp, with the load beside it."""
from __future__ import annotations

import json

import pytest

from bench import decode


def test_phantom_mode_records_a_step_time_per_tp(tmp_path, shm_prefix):
    out = tmp_path / "decode.json"
    assert decode.main(["--phantom", "--model", "llama3-8b", "--tp", "2", "--batch", "2", "--output-len", "3",
                        "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    (rec,) = doc["records"]
    assert rec["tp"] == 2 and 0 < rec["tpot_s"] < 10 and rec["emu_tpot_s"] > 0 and rec["loadavg_1m"] >= 0


def test_a_model_without_phantom_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        decode.main(["--model", "llama3-8b"])
    assert exc.value.code == 2 and "--model needs --phantom" in capsys.readouterr().err


def test_tiny_model_mode_alternates_the_engines_and_takes_ratios_within_rounds(tmp_path, shm_prefix):
    pytest.importorskip("transformers")
    out = tmp_path / "decode.json"
    assert decode.main(["--tp", "1", "2", "--batch", "2", "--output-len", "6", "--rounds", "3",
                        "--json", str(out)]) == 0  # 0: same tokens on every tp and round, emulated figures repeat
    doc = json.loads(out.read_text())
    ours = {r["tp"]: r for r in doc["records"] if r["tp"] is not None}
    reference = next(r for r in doc["records"] if r["engine"] == "transformers generate (1 thread)")
    assert sorted(ours) == [1, 2] and doc["outputs_identical_across_tp"] is True
    for tp, rec in ours.items():
        per_round = doc["ratios_per_round"][str(tp)]
        assert len(per_round) == len(rec["decode_tok_s_per_round"]) == 3
        # each round's ratio is that round's tokens/s over that round's reference, and the reported one their median
        assert per_round == pytest.approx([a / b for a, b in zip(rec["decode_tok_s_per_round"],
                                                                  reference["decode_tok_s_per_round"])])
        assert doc["ratio_to_transformers_1_thread"][str(tp)] == pytest.approx(sorted(per_round)[1])
        assert rec["emu_tpot_s"] > 0 and len(rec["token_ids"]) == 2


def test_bad_rounds_are_refused_before_anything_loads(capsys):
    with pytest.raises(SystemExit) as exc:
        decode.main(["--rounds", "0"])
    assert exc.value.code == 2 and "--rounds and --batch must be at least 1" in capsys.readouterr().err
