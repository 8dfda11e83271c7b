"""The inference benchmark program: its table, its JSON, its plot, and figures that repeat exactly."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from bench import inference
from devices.memory import OutOfDeviceMemory

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


def test_batch_that_does_not_fit_names_card_and_missing_memory(shm_prefix):
    with pytest.raises(OutOfDeviceMemory, match=r"card 0: a batch of 512 x 8192 tokens needs .*missing"):
        inference.main(["--model", "llama3-8b", "--tp", "2", "--input-len", "4096", "--output-len", "4096",
                        "--batch-size", "512", "--shm-prefix", shm_prefix])


@pytest.mark.parametrize("args,message", [
    (["--device", "nosuch"], "unknown device preset 'nosuch'"),
    (["--model", "llama3-8b", "--tp", "3"], "cannot split this model over tp=3"),
    (["--topology", "torus"], "unknown topology 'torus'"),
    (["--tp", "2", "--instances", "2", "--placement", "0 4|0 5"], "--placement: instance 1 takes a card twice"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "bench.inference", *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_ctrl_c_is_one_line_and_exit_130():
    proc = subprocess.Popen([sys.executable, "-m", "bench.inference", "--sweep-batch", "--decode-samples", "0",
                             "--backend", "sim"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("# llama3-8b")  # it is working
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err


def test_batch_sweep_stops_where_the_kv_cache_is_full_and_says_so(tmp_path, capsys):
    import re

    out, png = tmp_path / "sweep.json", tmp_path / "batch.png"
    assert inference.main(["--model", "llama3-8b", "--tp", "4", "--input-len", "2048", "--output-len", "256",
                           "--sweep-batch", "--no-scaling", "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    kv_tokens = int(re.search(r"KV cache: (\d+) tokens per instance", text).group(1))
    fit = int(re.search(r"at most (\d+) sequences of 2304 tokens per instance: the sweep stops there", text).group(1))
    assert fit == kv_tokens // 2304  # whole 16-token blocks: 2304 is a multiple of 16
    batches = [r["batch"] for r in json.loads(out.read_text())["records"]]
    assert batches[:3] == [1, 2, 4] and batches[-1] == fit
    assert png.stat().st_size > 10_000  # TPS and TPOT against batch


@pytest.mark.parametrize("args,message", [
    (["--overlap", "sometimes"], "argument --overlap: overlap must be 'on', 'off' or a number of chunks"),
    (["--overlap", "17"], "argument --overlap: overlap must be 'on', 'off' or a number of chunks 1..16"),
    (["--fusion", "all"], "argument --fusion: invalid choice: 'all'"),
    (["--host-overhead", "pentium"], "argument --host-overhead: host overhead must be off, on or a host preset"),
])
def test_bad_compiler_options_are_named(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        inference.parse_args(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_breakdown_and_trace_of_the_compiler_options(tmp_path, capsys):
    """--breakdown's rows add up to the step; --trace holds instance 0's steps, each filled by its spans."""
    trace = tmp_path / "t.json"
    args = ["--model", "llama3-8b", "--tp", "2", "--input-len", "512", "--output-len", "4", "--batch-size", "4",
            "--no-scaling", "--decode-samples", "0", "--fusion", "ops", "--overlap", "on", "--host-overhead", "on"]
    assert inference.main([*args, "--breakdown", "--trace", str(trace), "--json", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    table = {}
    for line in text.split("where a step's time goes")[1].splitlines()[2:]:
        parts = line.rsplit(None, 2)
        if len(parts) == 3 and parts[0].strip() in ("fused", "matmul", "attention", "norm", "elementwise", "embed",
                                                     "collectives exposed", "collectives hidden", "host", "step"):
            table[parts[0].strip()] = (float(parts[1]), float(parts[2]))
    for col in (0, 1):
        compute = sum(v[col] for k, v in table.items() if not k.startswith(("collectives", "host", "step")))
        assert compute + table["collectives exposed"][col] == pytest.approx(table["step"][col], abs=0.2)
    assert table["collectives hidden"][0] > 0 and table["host"][1] == pytest.approx(1_000 + 4 * 45, abs=0.1)
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["records"][0]["fusion"] == "ops" and set(rec["breakdown"]) == {"prefill", "decode"}
    ev = json.loads(trace.read_text())["traceEvents"]
    steps = [e for e in ev if e["ph"] == "X" and e["pid"] == 0]
    assert len(steps) == 1 + 3  # the prefill step (4 x 512 tokens in chunks of 2048) and 3 decode steps
    for k, step in enumerate(steps):
        mine = [e for e in ev if e["ph"] == "X" and e["pid"] > 0 and e["args"]["step"] == k]
        assert {e["pid"] for e in mine} == {1, 2}
        assert max(e["ts"] + e["dur"] for e in mine) == pytest.approx(step["ts"] + step["dur"])
