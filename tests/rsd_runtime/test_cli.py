"""rsd-launch as a user runs it: a real process, its output and exit codes."""
from __future__ import annotations

import json
import os
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
