"""Cards as real processes with real shared memory: launch, data, capacity, faults."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from conftest import assert_no_leaks, run_leftovers, wait_until
from devices.kv_cache import KVLayout
from devices.shm import SHM_DIR, Segment, sweep
from devices.spec import DeviceSpec, get_spec
from rsd_runtime import CardDied, CardError, Cluster, ClusterError


@pytest.mark.parametrize("n", [1, 4, 8])
def test_launch_and_shutdown(n, shm_prefix):
    with Cluster(num_devices=n, shm_prefix=shm_prefix) as cluster:
        rows = cluster.status()
        assert [r["card"] for r in rows] == list(range(n))
        pids = [r["pid"] for r in rows]
        assert len(set(pids)) == n and os.getpid() not in pids
        for r in rows:
            assert psutil.pid_exists(r["pid"])
            assert r["state"] == "idle"
            assert r["memory_used"] == 0
            assert r["memory_capacity"] == get_spec("atom-plus").memory_bytes == 16 * 2**30
            assert r["host_rss"] > 0 and r["clock_ns"] == 0
        assert len(run_leftovers(shm_prefix)) == 4 * n  # weights, manifest, fabric window, inbox per card
    assert not any(_alive(p) for p in pids)


def tiny_spec(mib: int) -> DeviceSpec:
    return DeviceSpec(name="tiny", peak_ops={"float32": 1e12}, memory_bytes=mib << 20, memory_bw=1e11,
                      sram_bytes=0, tdp_watts=10)


def test_capacity_error_names_card_request_and_free(shm_prefix):
    with Cluster(num_devices=2, device=tiny_spec(4), shm_prefix=shm_prefix) as cluster:
        cluster.put(1, "a", np.zeros(3 << 20, np.uint8))
        with pytest.raises(CardError) as err:
            cluster.put(1, "b", np.zeros((2 << 20) // 4, np.float32))
        msg = str(err.value)
        assert "card 1" in msg and "'b'" in msg and "2.00 MiB" in msg
        assert "1.00 MiB free of 4.00 MiB" in msg and "missing 1.00 MiB" in msg
        assert cluster.status()[1]["memory_used"] == 3 << 20
        cluster.put(0, "b", np.zeros((2 << 20) // 4, np.float32))  # card 0 still has room
        with pytest.raises(CardError, match=r"card 0: .*KV cache of 64 blocks"):
            cluster.kv_init(0, KVLayout(num_layers=2, num_blocks=64, block_size=16, num_kv_heads=4, head_dim=64))


def test_kill9_is_detected_and_fails_pending_calls(shm_prefix):
    with Cluster(num_devices=3, shm_prefix=shm_prefix) as cluster:
        pending = cluster.control.submit(2, "debug_sleep", {"seconds": 30})
        time.sleep(0.1)
        t0 = time.monotonic()
        cluster.kill(2)
        with pytest.raises(CardDied) as err:
            pending.result(timeout=2.0)
        assert time.monotonic() - t0 < 2.0
        assert err.value.card == 2 and "card 2" in str(err.value)
        assert "killed by signal 9 (SIGKILL)" in str(err.value)
        with pytest.raises(CardDied, match="card 2"):
            cluster.check()
        with pytest.raises(CardDied, match="SIGKILL"):
            cluster.get(2, "anything")
        rows = cluster.status()
        assert rows[2]["state"] == "dead" and rows[0]["state"] == "idle"
    assert_no_leaks()


def test_exit_code_is_reported(shm_prefix):
    with Cluster(num_devices=1, shm_prefix=shm_prefix) as cluster:
        with pytest.raises(CardDied, match="card 0 .*exited with code 7"):
            cluster.call(0, "debug_exit", code=7, timeout=2.0)


def test_a_stale_look_at_a_restarted_cards_old_process_does_not_kill_the_new_one(tmp_path):
    """The health check reads the card processes outside the control plane's lock: a look taken
    just before a restart's ``forget`` still sees the old process dead. That old pid is buried."""
    import zmq
    from rsd_runtime.control import ControlPlane
    seen = {"pid": 999}  # what the (stale) health check finds for card 1
    ctx = zmq.Context()
    cp = ControlPlane(ctx, f"ipc://{tmp_path}/control", "s" * 32, num_cards=2,
                      check_cards=lambda: {1: CardDied(1, seen["pid"], "was killed")}, heartbeat_timeout=60)
    try:
        assert wait_until(lambda: 1 in cp.dead, 2.0)
        cp.forget(1, 999)
        time.sleep(0.5)  # many health periods, each still seeing pid 999 dead
        assert 1 not in cp.dead
        seen["pid"] = 1000  # the new process dies: that death counts
        assert wait_until(lambda: 1 in cp.dead, 2.0) and cp.dead[1].pid == 1000
    finally:
        cp.close()
        ctx.term()


def test_restarted_card_reattaches_to_its_arena(shm_prefix):
    w = torch.randn(128, 64).bfloat16()
    with Cluster(num_devices=2, shm_prefix=shm_prefix) as cluster:
        cluster.put(1, "layers.0.w", w)
        cluster.put(1, "layers.0.b", np.arange(7, dtype=np.int64))
        used = cluster.status()[1]["memory_used"]
        old_pid = cluster.procs[1].pid
        cluster.kill(1)
        assert wait_until(lambda: 1 in cluster.control.dead, 2.0)
        hello = cluster.restart(1)
        assert hello["attached"] and hello["num_tensors"] == 2 and hello["pid"] != old_pid
        row = cluster.status()[1]
        assert row["state"] == "idle" and row["memory_used"] == used
        assert torch.equal(cluster.get(1, "layers.0.w"), w)
        np.testing.assert_array_equal(cluster.get(1, "layers.0.b"), np.arange(7))


def test_bad_arguments_leave_nothing(shm_prefix):
    with pytest.raises(ClusterError, match="unknown device preset 'atom-minus'; known presets: atom-plus"):
        Cluster(num_devices=2, device="atom-minus", shm_prefix=shm_prefix)
    for n in (0, -3):
        with pytest.raises(ClusterError, match="must be a whole number >= 1"):
            Cluster(num_devices=n, shm_prefix=shm_prefix)
    with pytest.raises(ClusterError, match="host memory"):
        Cluster(num_devices=1000, shm_prefix=shm_prefix)


def test_stale_segments_are_swept_and_foreign_ones_refused(shm_prefix):
    dead_pid = _dead_pid()
    stale = [f"{shm_prefix}_{dead_pid}_0badc0de_c000_weights", f"{shm_prefix}_{dead_pid}_0badc0de_c000_manifest"]
    for name in stale:
        Segment(name, 4096, create=True).close()
    with Cluster(num_devices=1, shm_prefix=shm_prefix) as cluster:
        assert sorted(sum(cluster.sweep_report.removed.values(), [])) == sorted(stale)
    assert not any((SHM_DIR / n).exists() for n in stale)
    foreign = SHM_DIR / f"{shm_prefix}_not-one-of-ours"
    foreign.write_bytes(b"x")
    try:
        with pytest.raises(ClusterError, match="not this user's rsd-runtime segments"):
            Cluster(num_devices=1, shm_prefix=shm_prefix).start()
        assert foreign.exists()  # never touched
    finally:
        foreign.unlink()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_host_signal_shuts_cards_down(sig, host_process):
    proc, pids, run_segments = host_process()
    proc.send_signal(sig)
    proc.wait(10)
    assert proc.returncode != 0
    assert wait_until(lambda: not any(_alive(p) for p in pids), 5.0)
    assert run_segments() == []


def test_host_kill9_leaves_no_orphans_segments_or_run_dir(host_process):
    proc, pids, run_segments = host_process()
    run_dir = proc.run_dir
    assert run_dir.is_dir()
    proc.kill()
    proc.wait(10)
    assert wait_until(lambda: not any(_alive(p) for p in pids), 5.0), f"cards outlived their host: {_describe(pids)}"
    assert wait_until(lambda: run_segments() == [], 5.0)
    assert wait_until(lambda: not run_dir.exists(), 5.0), f"{run_dir} outlived its host"


def test_an_llm_made_in_a_thread_that_ends_keeps_its_cards(shm_prefix):
    from rsd_runtime.llm import LLM
    from rsd_runtime.sampling import SamplingParams

    made = {}
    t = threading.Thread(target=lambda: made.setdefault("llm", LLM(tensor_parallel_size=2, shm_prefix=shm_prefix,
                                                                   progress=False)))
    t.start()
    t.join()
    with made["llm"] as llm:
        time.sleep(0.5)  # a parent-death signal tied to the thread would have ended the cards by now
        llm.engine.cluster.check()
        out = llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
        assert len(out.token_ids) == 3
        assert [r["state"] for r in llm.engine.cluster.status()] == ["idle", "idle"]


def test_sweep_removes_run_dirs_of_dead_hosts_only(shm_prefix, capsys):
    from devices.shm import run_dir_root
    from rsd_runtime.cli import main

    stale = run_dir_root() / f"{shm_prefix}_{_dead_pid()}_0badc0de-x1"
    live = run_dir_root() / f"{shm_prefix}_{os.getpid()}_0badc0de-x2"
    for d in (stale, live):
        d.mkdir()
        (d / "card0.log").write_text("log")
    try:
        assert main(["sweep", "--shm-prefix", shm_prefix]) == 0
        assert f"removed run directory {stale}" in capsys.readouterr().out
        assert not stale.exists() and live.is_dir()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)


HOST_SCRIPT = """
import sys, time
import numpy as np
from rsd_runtime import Cluster
with Cluster(num_devices=2, shm_prefix=sys.argv[1]) as c:
    c.put(0, "w", np.ones(1000))
    print(" ".join(str(r["pid"]) for r in c.status()), c.run_dir, flush=True)
    time.sleep(60)
"""


@pytest.fixture
def host_process(shm_prefix, tmp_path):
    """A host in its own process with 2 cards; killed with its cards whatever the test does."""
    import subprocess
    import sys

    started = []

    def start():
        script = tmp_path / "host.py"
        script.write_text(HOST_SCRIPT)
        proc = subprocess.Popen([sys.executable, str(script), shm_prefix], stdout=subprocess.PIPE, text=True)
        *pids, run_dir = proc.stdout.readline().split()
        pids = [int(p) for p in pids]
        proc.run_dir = Path(run_dir)
        started.append((proc, pids))
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)

        def run_segments():
            return [n for n in run_leftovers(shm_prefix) if n.startswith(f"{shm_prefix}_{proc.pid}_")]

        assert len(run_segments()) == 8  # weights, manifest, fabric window, inbox per card
        return proc, pids, run_segments

    yield start
    for proc, pids in started:
        for pid in [proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(5)
    sweep(shm_prefix)


def _describe(pids) -> list:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out.append((pid, p.status(), p.ppid(), p.cmdline()[-6:], [t.id for t in p.threads()]))
        except psutil.NoSuchProcess:
            out.append((pid, "gone"))
    return out


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _dead_pid() -> int:
    pid = 4_000_000
    while psutil.pid_exists(pid):
        pid += 1
    return pid


def test_ctrl_c_during_a_clean_up_is_taken_after_it():
    """A Ctrl-C that lands in Cluster.shutdown's clean-up is raised once the clean-up is done."""
    import os
    import signal

    from rsd_runtime.cluster import signals_deferred

    steps = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal has been handled by now: recorded, not raised
            steps.append("after the signal")
    assert steps == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
