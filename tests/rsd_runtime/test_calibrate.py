"""rsd-launch calibrate recovers a known card from points it generated; bad measurement files are named."""
from __future__ import annotations

from dataclasses import replace

import pytest

from devices.spec import get_spec
from rsd_runtime import cli
from rsd_runtime.calibrate import Point, predict, read_points
from rsd_runtime.tiny_model import ensure_tiny_model


def test_calibrate_recovers_the_card_that_made_the_points(tmp_path, capsys):
    base = get_spec("atom-plus")
    true = replace(base, compute_efficiency=0.55, memory_efficiency=0.65, op_overhead_ns=3500)
    # a compute-bound prefill, a memory-bound decode batch, a tiny model whose time is launches
    points = [Point("llama3-8b", 2, 1, 512, 3, None, None), Point("llama3-8b", 2, 8, 64, 3, None, None),
              Point(str(ensure_tiny_model()), 1, 1, 16, 3, None, None),
              Point("llama3-8b", 2, 4, 128, 3, None, None, fit=False)]
    rows = ["model,tp,batch,input_len,output_len,ttft_s,tpot_s,use"]
    for p in points:
        ttft, tpot = predict(p, true, None)
        rows.append(f"{p.model},{p.tp},{p.batch},{p.input_len},{p.output_len},{ttft!r},{tpot!r},"
                    f"{'fit' if p.fit else 'check'}")
    csv, toml = tmp_path / "points.csv", tmp_path / "fitted.toml"
    csv.write_text("\n".join(rows) + "\n")
    assert cli.main(["calibrate", "--device", "atom-plus", "--measurements", str(csv), "--out", str(toml)]) == 0
    out = capsys.readouterr().out
    assert "fitted on 3 of 4 points" in out and " check " in out
    fitted = get_spec(str(toml))
    assert fitted.name == "atom-plus-calibrated" and fitted.peak_ops == base.peak_ops
    assert fitted.compute_efficiency == pytest.approx(0.55, rel=1e-3)
    assert fitted.memory_efficiency == pytest.approx(0.65, rel=1e-3)
    assert fitted.op_overhead_ns == pytest.approx(3500, abs=20)
    errors = [float(x) for line in out.splitlines() if line.strip()[:1].isdigit() for x in line.split()[-2:]]
    assert len(errors) == 8 and max(map(abs, errors)) < 0.1  # percent, the held-out point included


@pytest.mark.parametrize("text,message", [
    ("model,tp\nx,1\n", "missing columns"),
    ("model,tp,batch,input_len,output_len,ttft_s,tpot_s\nllama3-8b,4,one,8,8,0.1,0.01\n",
     "line 2: batch must be a number"),
    ("model,tp,batch,input_len,output_len,ttft_s,tpot_s,use\nllama3-8b,4,1,8,8,0.1,0.01,check\n",
     "no point has use=fit"),
])
def test_bad_measurements_are_named(tmp_path, text, message, capsys):
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_points(str(path))
    assert cli.main(["calibrate", "--measurements", str(path)]) == 2
    assert message.split(":")[0] in capsys.readouterr().err
