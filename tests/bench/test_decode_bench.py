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
