"""Run ``rsd-launch serve`` as a child process: for tests, benchmarks and scripts.

    with ServerProcess(tp=2) as srv:                 # a free port on loopback, waits for /health
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none")
        ...
    # stopped with SIGTERM; raises if a card process or a /dev/shm segment of its run is left

The server's stderr is kept (the last lines) so that a failed start says why.
"""
from __future__ import annotations

import collections
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from devices import shm


class ServerError(RuntimeError):
    """The server did not come up, or did not go down cleanly."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *, model: str | None = None, tp: int = 2, phantom: bool = False, port: int | None = None,
                 host: str = "127.0.0.1", shm_prefix: str | None = None, extra_args: list[str] = (),
                 start_timeout: float = 120.0):
        self.host, self.port = host, port or free_port(host)
        self.shm_prefix = shm_prefix or "srv" + secrets.token_hex(3)
        self.args = [sys.executable, "-m", "rsd_runtime.cli", "serve", "--tp", str(tp), "--host", host,
                     "--port", str(self.port), "--shm-prefix", self.shm_prefix, *extra_args]
        if model:
            self.args += ["--model", str(model)]
        if phantom:
            self.args.append("--phantom")
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=40)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, wait: bool = True) -> "ServerProcess":
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._read_log, daemon=True).start()
        if wait:
            try:
                self.wait_healthy(self.start_timeout)
            except BaseException:
                self.stop(check=False)
                raise
        return self

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self._log.append(line.rstrip("\n"))

    def log_tail(self) -> str:
        return "\n".join(self._log)

    def health(self, timeout: float = 2.0) -> tuple[int, dict]:
        """(HTTP status, body) of GET /health; (0, {}) if nothing answers."""
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return 0, {}

    def wait_healthy(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"the server exited with code {self.proc.returncode} before it was healthy; "
                                  f"its log ends:\n{self.log_tail()}")
            status, body = self.health()
            if status == 200:
                return body
            time.sleep(0.1)
        raise ServerError(f"the server at {self.base_url} was not healthy within {timeout:.0f} s; its log ends:\n"
                          f"{self.log_tail()}")

    def stop(self, timeout: float = 20.0, check: bool = True) -> int | None:
        """SIGTERM, wait, then (with ``check``) raise if a card process or a segment of its run is left."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise ServerError(f"the server did not stop within {timeout:.0f} s of SIGTERM; killed. "
                                  f"Its log ends:\n{self.log_tail()}") from None
        code = self.proc.returncode
        if check:
            self.check_clean()
        return code

    def leftovers(self) -> tuple[list[int], list[str]]:
        """Card processes still running, and /dev/shm segments and temp run directories of this server's runs
        (a rack's instances take the prefix followed by their index)."""
        import psutil

        pids = []  # cards carry their run's name (which starts with the prefix) on their command line
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            cmd = proc.info["cmdline"] or []
            if proc.info["status"] != psutil.STATUS_ZOMBIE and "--run" in cmd and any(
                    a.startswith(self.shm_prefix) for a in cmd):
                pids.append(proc.info["pid"])
        left = [str(p) for p in shm.SHM_DIR.glob(f"{self.shm_prefix}*_*")]
        left += [str(p) for p in Path(tempfile.gettempdir()).glob(f"{self.shm_prefix}*_*")]
        return pids, sorted(left)

    def check_clean(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            pids, segments = self.leftovers()
            if not pids and not segments:
                return
            if time.monotonic() >= deadline:
                raise ServerError(f"after the server stopped: card processes {pids} still run; left: {segments}")
            time.sleep(0.05)

    def __enter__(self) -> "ServerProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop(check=exc[0] is None)
