"""rsd-launch as a user runs it: a real process, its output and exit codes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devices.shm import SHM_DIR


def rsd_launch(*args, prefix: str) -> subprocess.CompletedProcess:
    exe = shutil.which("rsd-launch", path=str(Path(sys.executable).parent)) or shutil.which("rsd-launch")
    cmd = [exe] if exe else [sys.executable, "-m", "rsd_runtime.cli"]
    return subprocess.run([*cmd, "--shm-prefix", prefix, *args], capture_output=True, text=True, timeout=60)


def test_status_prints_one_row_per_card(shm_prefix):
    r = rsd_launch("--devices", "3", "status", prefix=shm_prefix)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "3 x atom-plus" in lines[0]
    assert lines[1].split()[:3] == ["card", "pid", "state"]
    rows = [ln.split() for ln in lines[3:]]
    assert [row[0] for row in rows] == ["0", "1", "2"]
    assert all(row[2] == "idle" and "16.00 GiB" in " ".join(row) for row in rows)


def test_status_json(shm_prefix):
    r = rsd_launch("--devices", "2", "--json", "status", prefix=shm_prefix)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["card"] for row in rows] == [0, 1]
    assert all(row["memory_capacity"] == 16 << 30 and row["pid"] > 0 for row in rows)


@pytest.mark.parametrize("args,message", [
    (["--devices", "0", "status"], "must be a whole number >= 1"),
    (["--device", "atom-minus", "status"], "unknown device preset 'atom-minus'"),
    (["--devices", "5000", "status"], "exceeds the limit"),
    (["--devices", "900", "status"], "host memory"),
])
def test_bad_input_exits_nonzero_with_message(args, message, shm_prefix):
    r = rsd_launch(*args, prefix=shm_prefix)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_foreign_segment_is_named_and_refused(shm_prefix):
    foreign = SHM_DIR / f"{shm_prefix}_someone-elses"
    foreign.write_bytes(b"x")
    try:
        for cmd in (["status"], ["sweep"]):
            r = rsd_launch(*cmd, prefix=shm_prefix)
            assert r.returncode == 2 and str(foreign) in r.stderr, r.stderr
        assert foreign.exists()
    finally:
        os.unlink(foreign)


def test_sweep_removes_stale_runs(shm_prefix):
    stale = SHM_DIR / f"{shm_prefix}_4999999_deadbeef_c000_weights"
    stale.write_bytes(b"x")
    r = rsd_launch("sweep", prefix=shm_prefix)
    assert r.returncode == 0 and "removed 1 segments of stale run" in r.stdout
    assert not stale.exists()


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rsd_runtime.cli", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("args,message", [
    (["--devices", "2", "generate", "--tp", "4"], "--devices 2 disagrees with --tp 4"),
    (["generate", "--devices", "2", "--tp", "4"], "--devices 2 disagrees with --tp 4"),
    (["--devices", "2", "sweep"], "--devices means nothing to `sweep`"),
    (["--phantom", "topo"], "--phantom means nothing to `topo`"),
    (["--json", "sweep"], "--json means nothing to `sweep`"),
    (["serve", "--stream-interval", "0"], "--stream-interval must be >= 1, got 0"),
])
def test_conflicting_or_meaningless_flags_are_refused(args, message):
    r = run_cli(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_subcommand_help_offers_only_its_flags():
    sweep = run_cli("sweep", "--help").stdout
    assert "--shm-prefix" in sweep and "--dry-run" in sweep
    assert not any(flag in sweep for flag in ("--devices", "--device ", "--phantom", "--json"))
    topo = run_cli("topo", "--help").stdout
    assert "--devices" in topo and "--json" in topo and "--phantom" not in topo and "--shm-prefix" not in topo
    generate = run_cli("generate", "--help").stdout
    assert "--ignore-eos" in generate and "go on past the end-of-sequence" in generate


def test_generate_check_weights_names_the_tensor_holding_nan(shm_prefix, tmp_path):
    from safetensors.torch import load_file, save_file

    from rsd_runtime.tiny_model import ensure_tiny_model

    model = tmp_path / "tiny"
    shutil.copytree(ensure_tiny_model(), model)
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"][2] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    r = rsd_launch("generate", "--model", str(model), "--tp", "2", "--check-weights", prefix=shm_prefix)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tensor model.norm.weight holds 1 non-finite values (first: nan at index [2])" in r.stderr


def test_generate_inject_kills_a_card_at_a_step_and_names_it(shm_prefix):
    r = rsd_launch("generate", "--tp", "2", "--max-new-tokens", "8", "--inject", "link:src=0:dst=1:bw=0.5:lat_us=2",
                   "--inject", "kill:card=1:step=3", prefix=shm_prefix)
    assert "injected: link 0->1: bandwidth x0.5, latency +2000 ns from emulated 0 ns" in r.stderr
    assert "injected: kill card 1 before its step 3" in r.stderr
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "card 1" in r.stderr and "SIGKILL" in r.stderr
    r = rsd_launch("generate", "--tp", "2", "--inject", "kill:card=1:step=zero", prefix=shm_prefix)
    assert r.returncode == 2 and "step='zero' is not an integer" in r.stderr


# -- generate, as a new user meets it ------------------------------------------------------

PROMPT = "The weather today is"


def test_stop_string_is_not_streamed(shm_prefix):
    from rsd_runtime.cli import printable

    first = rsd_launch("generate", "--tp", "1", "--prompt", PROMPT, "--max-new-tokens", "12", "--ignore-eos",
                       "--json", prefix=shm_prefix)
    assert first.returncode == 0, first.stderr
    docs = json.loads(first.stdout)
    assert isinstance(docs, list) and len(docs) == 1  # one shape, whatever the number of prompts
    text = docs[0]["text"]
    # a stop string that starts inside the text, not at its start
    i, stop = next((i, text[i:i + 2]) for i in range(1, len(text) - 1)
                   if text.find(text[i:i + 2]) == i and text[i:i + 2].strip())
    streamed = rsd_launch("-v", "generate", "--tp", "2", "--prompt", PROMPT, "--max-new-tokens", "12",
                          "--ignore-eos", "--stop", stop, prefix=shm_prefix)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == PROMPT + printable(text[:i]) + "\n"
    assert "(stop)" in streamed.stderr and "; total " in streamed.stderr
    # -v: each phase with its wall time
    for step in ("start 2 cards: ", "compile for tp=2: ", "place the weight shards: ", "generate 1 prompt(s): ",
                 "shut down 2 cards: "):
        assert re.search(rf"^rsd-launch: .*{re.escape(step)}\d+\.\d+ s$", streamed.stderr, re.M), streamed.stderr


def test_without_tokenizer_token_ids_are_shown(tmp_path, shm_prefix):
    from rsd_runtime.tiny_model import ensure_tiny_model

    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for f in ensure_tiny_model().iterdir():
        if f.name != "tokenizer.json":
            (model / f.name).symlink_to(f)
    refused = rsd_launch("generate", "--model", str(model), "--tp", "1", prefix=shm_prefix)
    assert refused.returncode == 2 and "has no tokenizer" in refused.stderr and "--prompt-ids" in refused.stderr
    assert refused.stdout == ""  # nothing echoed, no card started
    r = rsd_launch("generate", "--model", str(model), "--tp", "1", "--prompt-ids", "1,2,3", "--max-new-tokens", "4",
                   "--ignore-eos", prefix=shm_prefix)
    assert r.returncode == 0, r.stderr
    head, ids = r.stdout.strip().split(" -> output ids ")
    assert head == "prompt ids [1, 2, 3]" and len(ids.split()) == 4 and all(t.isdigit() for t in ids.split())


def test_phantom_run_labels_its_tokens_and_several_prompts_are_labelled(shm_prefix):
    r = rsd_launch("--phantom", "generate", "--tp", "1", "--prompt", "a", "--prompt", "b c", "--max-new-tokens", "3",
                   "--ignore-eos", prefix=shm_prefix)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "[0] prompt: a", "[0] output: 3 placeholder tokens (phantom cards do no math; the timings are real)",
        "[1] prompt: b c", "[1] output: 3 placeholder tokens (phantom cards do no math; the timings are real)"]
    summaries = [ln for ln in r.stderr.splitlines() if " tokens (length)" in ln]
    assert [ln[:7] for ln in summaries] == ["[0] -- ", "[1] -- "]


def test_phantom_preset_with_text_is_refused_before_cards_start(shm_prefix):
    r = rsd_launch("--phantom", "generate", "--model", "llama3-8b", "--tp", "4", prefix=shm_prefix)
    assert r.returncode == 2 and "'llama3-8b' has no tokenizer" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == "" and "starting cards" not in r.stderr


def test_cap_on_new_tokens_is_said(shm_prefix):
    ids = ",".join(["5"] * 1020)  # the tiny model's context is 1024 tokens
    r = rsd_launch("generate", "--tp", "1", "--prompt-ids", ids, "--max-new-tokens", "5000", "--ignore-eos", "--json",
                   prefix=shm_prefix)
    assert r.returncode == 0, r.stderr
    assert "gets at most 4 new tokens, not --max-new-tokens 5000" in r.stderr
    assert len(json.loads(r.stdout)[0]["token_ids"]) == 4


@pytest.mark.parametrize("args,message", [
    (["--prompt-ids", "1,x"], "argument --prompt-ids: expected token ids separated by commas, like 1,2,3; got '1,x'"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an int >= 1, got 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
])
def test_bad_generate_flags_are_named(args, message):
    r = run_cli("generate", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "max_tokens" not in r.stderr and "int()" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--overlap", "maybe"], "argument --overlap: overlap must be 'on', 'off' or a number of chunks 1..16"),
    (["--fusion", "kernel"], "argument --fusion: invalid choice: 'kernel'"),
    (["--host-overhead", "abacus"], "argument --host-overhead: host overhead must be off, on or a host preset"),
])
def test_bad_compiler_flags_of_generate_are_named(args, message, capsys):
    from rsd_runtime import cli

    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["generate", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_generate_options_reach_the_engine():
    from rsd_runtime import cli

    args = cli.build_parser().parse_args(["generate", "--overlap", "4", "--fusion", "layer", "--host-overhead",
                                          "xeon-python-async", "--trace", "t.json"])
    assert (args.overlap, args.fusion, args.host_overhead, args.trace) == ("4", "layer", "xeon-python-async",
                                                                           "t.json")
