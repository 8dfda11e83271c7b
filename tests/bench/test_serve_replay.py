"""bench.serve --replay: a rack replayed on the emulated clock, repeatable, and equal on every backend."""
from __future__ import annotations

import json

import pytest

from bench import serve

SMALL = ["--replay", "--num-prompts", "10", "--request-rate", "40", "--input-len", "40", "--output-len", "6",
         "--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--seed", "3", "--disable-tqdm"]
WALL_KEYS = {"wall_s", "config"}


def replay(tmp_path, name: str, *extra) -> dict:
    path = tmp_path / f"{name}.json"
    assert serve.main([*SMALL, *extra, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def emulated(doc: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_KEYS} for r in doc["runs"]]


def test_replay_repeats_exactly_and_keeps_vllm_keys(tmp_path):
    args = ("--phantom", "--model", "llama3-8b", "--tp", "2", "--instances", "1,2", "--routing", "round-robin")
    a, b = replay(tmp_path, "a", *args), replay(tmp_path, "b", *args)
    assert emulated(a) == emulated(b)
    assert a["clock"] == "emulated" and len(a["runs"]) == 2
    for key in ("completed", "output_throughput", "mean_ttft_ms", "p99_tpot_ms", "median_itl_ms", "mean_e2el_ms",
                "request_throughput", "total_token_throughput"):
        assert key in a, key
    one, two = a["runs"]
    assert one["completed"] == two["completed"] == 10 and one["failed"] == 0
    assert two["served_per_instance"] == [5, 5]  # round-robin over two instances
    assert one["total_output_tokens"] == 10 * 6


def test_replay_on_card_processes_equals_the_in_process_instances(tmp_path):
    args = ("--phantom", "--model", "llama3-8b", "--tp", "2", "--instances", "2")
    sim = replay(tmp_path, "sim", *args)
    cards = replay(tmp_path, "cards", *args, "--backend", "cards")
    assert emulated(sim) == emulated(cards)


def test_replay_on_a_study_topology_puts_tp8_in_one_box(tmp_path):
    """A 16-card study preset under tp=8 instances: each takes the first box, whatever joins the boxes."""
    args = ("--phantom", "--model", "llama3-8b", "--device", "gpu-mi300x", "--tp", "8", "--num-prompts", "4")
    std = replay(tmp_path, "std", *args, "--topology", "1s-2rp-std-cascade")
    split = replay(tmp_path, "split", *args, "--topology", "2s-2rp-split-flat")
    tree = replay(tmp_path, "tree", *args, "--topology", "switch-tree")  # 8 cards over two leaf switches
    strip = lambda runs: [{k: v for k, v in r.items() if k != "topology"} for r in runs]  # noqa: E731
    assert std["runs"][0]["completed"] == 4
    assert strip(emulated(std)) == strip(emulated(split)) != strip(emulated(tree))


def test_real_tiny_model_on_cards_gives_the_phantom_emulated_figures(tmp_path):
    from rsd_runtime.tiny_model import ensure_tiny_model

    model = str(ensure_tiny_model())
    few = ("--num-prompts", "6", "--tp", "2", "--routing", "round-robin")
    real = replay(tmp_path, "real", "--model", model, *few)
    phantom = replay(tmp_path, "phantom", "--model", model, "--phantom", "--backend", "cards", *few)
    strip = lambda runs: [{k: v for k, v in r.items() if k != "model"} for r in runs]  # noqa: E731
    assert strip(emulated(real)) == strip(emulated(phantom))


@pytest.mark.parametrize("args,message", [
    (["--routing", "fastest"], "unknown routing policy 'fastest'"),
    (["--instances", "0"], "--instances must be >= 1"),
    (["--request-rate", "4,x"], "--request-rate takes a comma-separated list"),
    (["--kv-utilization", "1.5"], "--kv-utilization must be in"),
])
def test_bad_replay_options_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        serve.main([*SMALL, "--phantom", *args])


@pytest.mark.parametrize("line,message", [
    ('{"prompt": [5, 6], "output_len": 4, "arrival_s": -1}', "trace.jsonl:2: field 'arrival_s'"),
    ('{"prompt": [5, 6], "arrival_s": 1.0}', "trace.jsonl:2: field 'output_len'"),
    ('{"output_len": 4, "arrival_s": 1.0}', "trace.jsonl:2: field 'prompt'"),
    ('{"prompt": [5, 6], "output_len": 4}', "arrival_s is given on some lines but not all"),
])
def test_a_bad_trace_is_refused_naming_line_and_field(tmp_path, line, message):
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"prompt": [5, 6, 7], "output_len": 4, "arrival_s": 0.5}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        serve.main([*SMALL, "--phantom", "--dataset", str(trace)])


def test_replay_trace_draws_every_instance_and_host_costs_slow_it(tmp_path):
    args = ("--phantom", "--model", "llama3-8b", "--tp", "2", "--instances", "2", "--routing", "round-robin")
    bare = replay(tmp_path, "bare", *args)
    trace = tmp_path / "t.json"
    doc = replay(tmp_path, "host", *args, "--host-overhead", "on", "--fusion", "layer", "--trace", str(trace))
    assert doc["mean_ttft_ms"] > bare["mean_ttft_ms"] + 3.0  # 3 ms of scheduling, preparation and API per request
    ev = json.loads(trace.read_text())["traceEvents"]
    steps = [e for e in ev if e["ph"] == "X" and e["pid"] <= 0 and e["tid"] == 1]
    assert {e["pid"] for e in steps} == {0, -1} and len(steps) == sum(doc["steps"])
    names = {e["pid"]: e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {0: "host", -1: "host of instance 1", 1: "card 0", 2: "card 1", 3: "card 2", 4: "card 3"}
    assert {e["name"] for e in ev if e["ph"] == "X" and e["pid"] <= 0 and e["tid"] > 1} == {
        "prepare", "sample", "detokenise"}


def test_bad_trace_and_policy_exit_2_with_one_line(tmp_path, capsys):
    from bench.common import entry

    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"prompt": [5], "output_len": 4, "arrival_s": -1}\n')
    for argv in (["--dataset", str(trace)], ["--routing", "fastest"]):
        with pytest.raises(SystemExit) as exc:
            entry(lambda: serve.main([*SMALL, "--phantom", *argv]), "python -m bench.serve")
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
