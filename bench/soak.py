"""Soak: a serving load that runs for minutes while cards are killed and paused under it.

    python -m bench.soak --minutes 2 [--tp 2] [--clients 4] [--kill-every 20] [--pause-every 30] --json out.json

Concurrent async clients send greedy requests through ``AsyncLLM(restart_cards=True)`` (in process;
the built-in tiny model). Every ``--kill-every`` seconds one card gets SIGKILL; every ``--pause-every``
seconds one is stopped (SIGSTOP) for ``--pause-seconds`` and continued, and a pause longer than the
heartbeat timeout is a hung card that the engine ends and restarts. Each request ends one of three ways:

* served: it finished; its tokens must equal the reference of its prompt (else it counts as wrong);
* failed: it got an error that names the failure (EngineError and kin);
* lost: neither within ``--request-timeout`` (must be 0).

After each recovery a probe request checks that greedy tokens equal the reference again. Recovery
time (wall clock) runs from the fault to the engine's next recovery with every card healthy. Faults
go one at a time: one due while the last is still recovering waits for it.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import statistics
import sys
import time

from bench.common import entry, write_json
from devices import shm

PROMPTS = ["The weather today is", "Computers can", "When the rain stops, the", "A small program",
           "Once upon a time", "The engine"]


class Soak:
    def __init__(self, args):
        from rsd_runtime.async_llm import AsyncLLM
        from rsd_runtime.sampling import SamplingParams

        self.args = args
        self.params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        self.allm = AsyncLLM(tensor_parallel_size=args.tp, restart_cards=True, progress=False,
                             heartbeat_timeout=args.heartbeat_timeout, shm_prefix=args.shm_prefix)
        self.reference: dict[str, list[int]] = {}
        self.counts = {"served": 0, "failed": 0, "lost": 0, "wrong": 0}
        self.errors: dict[str, int] = {}  # first line of each error -> how often
        self.faults: list[dict] = []
        self.latencies: list[float] = []

    async def one(self, prompt: str) -> list[int]:
        return [t async for out in self.allm.generate(prompt, self.params) for t in out.token_ids]

    async def client(self, rng: random.Random, until: float) -> None:
        from rsd_runtime.async_llm import EngineError, EngineStopped, Overloaded

        while time.monotonic() < until:
            prompt = rng.choice(PROMPTS)
            t0 = time.monotonic()
            try:
                tokens = await asyncio.wait_for(self.one(prompt), self.args.request_timeout)
            except asyncio.TimeoutError:
                self.counts["lost"] += 1
                continue
            except (EngineError, EngineStopped, Overloaded) as exc:
                self.counts["failed"] += 1
                key = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
                self.errors[key] = self.errors.get(key, 0) + 1
                await asyncio.sleep(0.05)  # as a client would before it retries
                continue
            self.latencies.append(time.monotonic() - t0)
            self.counts["served" if tokens == self.reference[prompt] else "wrong"] += 1

    async def injector(self, rng: random.Random, until: float) -> None:
        a = self.args
        schedule = []
        if a.kill_every > 0:
            schedule += [(t, "kill") for t in _times(a.kill_every, a.minutes * 60)]
        if a.pause_every > 0:
            schedule += [(t, "pause") for t in _times(a.pause_every, a.minutes * 60)]
        start = time.monotonic()
        for at, kind in sorted(schedule):
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            if time.monotonic() >= until:
                return
            self.faults.append(await self.inject(kind, rng.choice(self.allm.engine.cards)))

    async def inject(self, kind: str, card: int) -> dict:
        eng = self.allm.engine
        recoveries = eng.stats.recoveries
        pid = eng.cluster.procs[card].pid
        t0 = time.monotonic()
        if kind == "kill":
            os.kill(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(self.args.pause_seconds)
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # declared hung and already ended by the recovery
        row = {"kind": kind, "card": card, "at_s": round(t0 - self.started, 3), "recovered": False,
               "recovery_s": None, "tokens_ok": None}
        deadline = t0 + self.args.request_timeout
        while time.monotonic() < deadline:
            if eng.stats.recoveries > recoveries and self.allm.health()["ok"]:
                row["recovered"], row["recovery_s"] = True, round(time.monotonic() - t0, 3)
                break
            if kind == "pause" and eng.stats.recoveries == recoveries and self.allm.health()["ok"] \
                    and time.monotonic() - t0 > self.args.pause_seconds + self.args.heartbeat_timeout + 1:
                break  # a pause shorter than the heartbeat timeout: only slower, nothing to recover
            await asyncio.sleep(0.02)
        prompt = PROMPTS[0]
        try:
            row["tokens_ok"] = await asyncio.wait_for(self.one(prompt), self.args.request_timeout) == \
                self.reference[prompt]
        except Exception as exc:  # noted, not fatal: the soak goes on
            row["tokens_ok"], row["probe_error"] = False, str(exc).splitlines()[0]
        return row

    async def run(self) -> dict:
        from tqdm import tqdm

        for p in PROMPTS:  # the reference, and the warm-up
            self.reference[p] = await self.one(p)
        self.started = time.monotonic()
        until = self.started + self.args.minutes * 60
        rngs = [random.Random(self.args.seed * 1000 + i) for i in range(self.args.clients + 1)]
        tasks = [asyncio.create_task(self.client(r, until)) for r in rngs[1:]]
        tasks.append(asyncio.create_task(self.injector(rngs[0], until)))
        with tqdm(total=int(self.args.minutes * 60), desc="soak", unit="s", file=sys.stderr, leave=False,
                  disable=not sys.stderr.isatty()) as bar:
            while not all(t.done() for t in tasks):
                await asyncio.sleep(1.0)
                bar.n = min(bar.total, int(time.monotonic() - self.started))
                bar.set_postfix(served=self.counts["served"], failed=self.counts["failed"],
                                lost=self.counts["lost"], faults=len(self.faults))
        for t in tasks:
            t.result()  # a client or injector bug surfaces here, not as a silent zero
        return self.summary(time.monotonic() - self.started)

    def summary(self, wall: float) -> dict:
        rec = [f["recovery_s"] for f in self.faults if f["recovery_s"] is not None]
        stats = self.allm.engine.stats
        return {**self.counts, "requests": sum(self.counts.values()), "wall_s": round(wall, 2),
                "kills": sum(f["kind"] == "kill" for f in self.faults),
                "pauses": sum(f["kind"] == "pause" for f in self.faults),
                "recoveries": stats.recoveries, "cards_restarted": stats.cards_restarted,
                "recovery_s_mean": round(statistics.mean(rec), 3) if rec else None,
                "recovery_s_max": round(max(rec), 3) if rec else None,
                "tokens_ok_after_every_recovery": all(f["tokens_ok"] for f in self.faults),
                "latency_s_median": round(statistics.median(self.latencies), 4) if self.latencies else None,
                "errors": self.errors, "faults": self.faults}


def _times(every: float, total: float) -> list[float]:
    n = int(total // every)
    return [every * (i + 1) for i in range(n) if every * (i + 1) < total]


def print_table(s: dict) -> None:
    print(f"{'requests':>9} {'served':>7} {'failed':>7} {'lost':>5} {'wrong':>6} {'kills':>6} {'pauses':>7} "
          f"{'restarts':>9} {'recovery mean/max (wall s)':>27} {'tokens ok':>10}")
    rec = "-" if s["recovery_s_mean"] is None else f"{s['recovery_s_mean']:.3f} / {s['recovery_s_max']:.3f}"
    print(f"{s['requests']:>9} {s['served']:>7} {s['failed']:>7} {s['lost']:>5} {s['wrong']:>6} {s['kills']:>6} "
          f"{s['pauses']:>7} {s['cards_restarted']:>9} {rec:>27} {str(s['tokens_ok_after_every_recovery']):>10}")
    for f in s["faults"]:
        took = "no recovery needed" if f["recovery_s"] is None else f"recovered in {f['recovery_s']:.3f} s"
        print(f"  {f['at_s']:8.1f} s  {f['kind']:<5} card {f['card']}: {took}; tokens after: "
              f"{'equal' if f['tokens_ok'] else 'DIFFERENT'}")
    for msg, n in s["errors"].items():
        print(f"  {n:5d} x {msg}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=1.0, help="how long the load runs (wall clock)")
    p.add_argument("--tp", type=int, default=2, help="cards of the instance")
    p.add_argument("--clients", type=int, default=4, help="concurrent async clients")
    p.add_argument("--kill-every", type=float, default=15.0, help="seconds between card kills (0: none)")
    p.add_argument("--pause-every", type=float, default=0.0, help="seconds between card pauses (0: none)")
    p.add_argument("--pause-seconds", type=float, default=3.0, help="how long a pause stops the card")
    p.add_argument("--heartbeat-timeout", type=float, default=2.0,
                   help="seconds without a heartbeat before a card counts as hung")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per request")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="a request without an answer by then is lost")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shm-prefix", default=shm.DEFAULT_PREFIX, help="prefix of the run's /dev/shm segments")
    p.add_argument("--json", metavar="PATH", help="write the result here")
    args = p.parse_args(argv)
    for name in ("minutes", "pause_seconds", "heartbeat_timeout", "request_timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("tp", "clients", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.kill_every < 0 or args.pause_every < 0:
        raise ValueError("--kill-every and --pause-every must be >= 0 (0: none)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("rsd").setLevel(logging.CRITICAL)  # the faults are on purpose: keep the table readable
    soak = Soak(args)
    try:
        summary = asyncio.run(soak.run())
    finally:
        soak.allm.close()
    print_table(summary)
    if args.json:
        write_json(args.json, "soak", vars(args), summary["faults"],
                   summary={k: v for k, v in summary.items() if k != "faults"})
    return 0 if summary["lost"] == 0 and summary["wrong"] == 0 and summary["tokens_ok_after_every_recovery"] else 1


if __name__ == "__main__":
    entry(main, "bench.soak")
