"""Every benchmark and script program as a user runs it: Ctrl-C ends it with one line and exit 130,
bad input with one line and exit 2; no traceback, no card process or segment left behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import run_leftovers, wait_until

pytestmark = pytest.mark.timeout(180)


def started(proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """True once the program runs its main(): it has started processes of its own (cards, workers)."""
    def has_children():
        try:
            return bool(psutil.Process(proc.pid).children())
        except psutil.Error:
            return False
    return wait_until(lambda: has_children() or proc.poll() is not None, timeout, 0.05) and proc.poll() is None


@pytest.mark.parametrize("program,args", [
    ("bench.collectives", ["--devices", "2", "--max-bytes", str(1 << 30), "--phantom"]),
    ("bench.launch", ["--devices", "2", "--repeats", "100"]),
    ("bench.decode", ["--tp", "2", "--batch", "1", "--output-len", "16"]),  # Ctrl-C as its cards start
    ("bench.gloo_ref", ["--world-size", "2", "--iters", "100000"]),
    ("scripts.phantom_rack", ["--cards", "4", "--tp", "2"]),
])
def test_ctrl_c_is_one_line_and_exit_130(program, args, shm_prefix):
    if "--shm-prefix" in subprocess.run([sys.executable, "-m", program, "--help"], capture_output=True,
                                        text=True, timeout=60).stdout:
        args = [*args, "--shm-prefix", shm_prefix]
    # its own session, so that Ctrl-C reaches the whole group, as a terminal sends it
    proc = subprocess.Popen([sys.executable, "-m", program, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert started(proc), proc.communicate()
        time.sleep(0.3)
        children = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = err.strip().splitlines()
    assert proc.returncode == 130, err
    assert lines[-1] == f"python -m {program}: interrupted; cards shut down" and "Traceback" not in err, err
    assert wait_until(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children), 10)
    assert not run_leftovers(shm_prefix)


@pytest.mark.parametrize("program,args,message", [
    ("bench.collectives", ["--device", "nosuch"], "unknown device preset 'nosuch'"),
    ("bench.decode", ["--device", "nosuch"], "unknown device preset 'nosuch'"),
    ("scripts.phantom_rack", ["--device", "nosuch"], "unknown device preset 'nosuch'"),
    ("bench.launch", ["--devices", "0"], "num_devices must be a whole number >= 1"),
    ("bench.gloo_ref", ["--dtype", "nosuch"], "unknown dtype 'nosuch'"),
])
def test_bad_input_is_one_line_and_exit_2(program, args, message):
    proc = subprocess.run([sys.executable, "-m", program, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"python -m {program}: error: {message}"), line


def test_no_benchmark_loads_torch_before_its_flags_are_checked():
    """A bad flag is named in a fraction of a second: no benchmark program imports torch at import time."""
    programs = ["collectives", "decode", "inference", "launch", "rack", "serve", "soak", "topology", "coe",
                "coe_replay"]
    code = ("import importlib, sys\n"
            f"for m in {programs!r}:\n"
            "    importlib.import_module('bench.' + m)\n"
            "    assert 'torch' not in sys.modules, m\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
