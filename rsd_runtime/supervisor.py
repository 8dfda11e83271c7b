"""Starting card processes and telling how they ended."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from devices.worker import HOST_PID_ENV, SECRET_ENV


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with code {returncode}"


@dataclass(slots=True)
class CardProcess:
    card: int
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


def spawn_card(card: int, *, run: str, control: str, secret: str, spec: str, run_dir: Path, steps: str | None = None,
               fabric_bind: str, attach: bool = False, phantom: bool = False, heartbeat_s: float = 0.25,
               log_level: str | None = None, slowdown: float = 0.0) -> CardProcess:
    """Start one card in a fresh interpreter (spawn, not fork)."""
    cmd = [sys.executable, "-m", "devices", "--run", run, "--card", str(card), "--control", control,
           "--spec", spec, "--heartbeat", str(heartbeat_s), "--fabric-bind", fabric_bind, "--run-dir", str(run_dir)]
    if steps:
        cmd += ["--steps", steps]
    if attach:
        cmd.append("--attach")
    if phantom:
        cmd.append("--phantom")
    if slowdown:
        cmd += ["--slowdown", str(slowdown)]
    env = dict(os.environ)
    env[SECRET_ENV] = secret
    env[HOST_PID_ENV] = str(os.getpid())
    env.setdefault("OMP_NUM_THREADS", "1")  # one compute thread per card: many cards share few cores
    if log_level:
        env["RSD_CARD_LOG"] = log_level
    log_path = run_dir / f"card{card}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 env=env, close_fds=True)
    return CardProcess(card, popen, log_path)
