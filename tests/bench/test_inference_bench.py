"""The inference benchmark program: its table, its JSON, its plot, and figures that repeat exactly."""
from __future__ import annotations

import json


from bench import inference

ARGS = ["--model", "llama3-8b", "--device", "atom-plus", "--tp", "4", "--instances", "2", "--input-len", "256",
        "--output-len", "64", "--batch-size", "1", "8", "--scaling-tp", "8"]


def run(tmp_path, shm_prefix, name, extra=()):
    out = tmp_path / f"{name}.json"
    assert inference.main([*ARGS, "--json", str(out), "--shm-prefix", shm_prefix, *extra]) == 0
    return json.loads(out.read_text())


def test_inference_bench_repeats_exactly(tmp_path, shm_prefix, capsys):
    first = run(tmp_path, shm_prefix, "a", ["--plot", str(tmp_path / "s.png")])
    second = run(tmp_path, shm_prefix, "b")
    keys = ("emu_ttft_s", "emu_tpot_s", "emu_tps", "emu_tps_per_watt")
    assert [[r[k] for k in keys] for r in first["records"]] == [[r[k] for k in keys] for r in second["records"]]
    assert first["scaling"] == second["scaling"]
    r1, r8 = first["records"]
    assert r1["batch"] == 1 and r8["batch"] == 8 and r8["emu_tps"] > r1["emu_tps"]
    assert r1["cards"] == 8 and r1["watts"] == 8 * 75
    # TPOT of a batch of one: about the time to stream one card's weights once (all but the embedding
    # table, of which a step reads one row per token) at 80% of 256 GB/s, plus per-op overheads
    weights_per_card = (8.03e9 - 128256 * 4096) * 2 / 4
    bound = weights_per_card / (256e9 * 0.8)
    assert bound < r1["emu_tpot_s"] < 1.1 * bound
    assert (tmp_path / "s.png").stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "max TPS at best batch" in text and "scaling" in text


def test_batch_that_does_not_fit_names_card_and_missing_memory(tmp_path, shm_prefix, capsys):
    rc = inference.main(["--model", "llama3-8b", "--tp", "2", "--input-len", "4096", "--output-len", "4096",
                         "--batch-size", "512", "--shm-prefix", shm_prefix])
    assert rc == 2
    err = capsys.readouterr().err
    assert "card 0: a batch of 512 x 8192 tokens needs" in err and "missing" in err
