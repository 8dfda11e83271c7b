"""Serving-benchmark figures from per-request results, under vLLM's ``benchmark_serving`` key names.

Clock-agnostic: ``summarize`` takes times in seconds from whichever clock the results were
read on (a live run: the wall clock; a replay: the emulated one) and the caller names it.

    s = summarize(results, duration_s=12.5, goodput=parse_goodput("ttft:50 tpot:10"))
    print_table(s, "Serving Benchmark Result", clock="wall")

TPOT of a request is (latency - TTFT) / (output tokens - 1), for requests with more than one
output token; ITL is every gap between consecutive tokens of every request; goodput counts
the requests that meet every given objective (ttft, tpot, e2el, in ms) per second.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GOODPUT_KEYS = ("ttft", "tpot", "e2el")


@dataclass(slots=True)
class RequestResult:
    ok: bool
    prompt_len: int = 0
    output_len: int = 0
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    error: str = ""
    emulated: dict | None = None  # the timings the server reported on the emulated clock (emu_*_s keys)
    instance: str | None = None  # the x-rsd-instance header of a rack's answer
    sent_s: float = 0.0  # when the request was sent, from the start of the run

    @property
    def tpot_s(self) -> float | None:
        if self.output_len < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_len - 1)


def parse_goodput(spec: str | list[str] | None) -> dict[str, float] | None:
    """"ttft:50 tpot:10" (or ["ttft:50", "tpot:10"]) -> {"ttft": 50.0, "tpot": 10.0}, in ms."""
    if spec is None:
        return None
    items = spec.split() if isinstance(spec, str) else [p for s in spec for p in s.split()]
    if not items:
        raise ValueError("--goodput needs at least one objective, e.g. ttft:50 tpot:10")
    out = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in GOODPUT_KEYS:
            raise ValueError(f"--goodput: {item!r} is not KEY:MS with KEY one of {', '.join(GOODPUT_KEYS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"--goodput: {item!r}: the objective must be > 0 ms")
        out[key] = ms
    return out


def _stats(prefix: str, values_s: list[float]) -> dict:
    ms = np.asarray(values_s, dtype=float) * 1e3
    if ms.size == 0:
        return {f"mean_{prefix}_ms": 0.0, f"median_{prefix}_ms": 0.0, f"std_{prefix}_ms": 0.0,
                f"p99_{prefix}_ms": 0.0}
    return {f"mean_{prefix}_ms": float(ms.mean()), f"median_{prefix}_ms": float(np.median(ms)),
            f"std_{prefix}_ms": float(ms.std()), f"p99_{prefix}_ms": float(np.percentile(ms, 99))}


def _meets(r: RequestResult, goodput: dict[str, float]) -> bool:
    got = {"ttft": r.ttft_s, "tpot": r.tpot_s or 0.0, "e2el": r.latency_s}
    return all(got[k] * 1e3 <= v for k, v in goodput.items())


def summarize(results: list[RequestResult], duration_s: float, goodput: dict[str, float] | None = None) -> dict:
    """vLLM's result keys: counts, throughputs (per second of ``duration_s``), latency statistics in ms."""
    if not duration_s > 0:
        raise ValueError(f"the run's duration must be > 0 s, got {duration_s}")
    ok = [r for r in results if r.ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    out = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration": duration_s,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s, "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "request_goodput": (sum(_meets(r, goodput) for r in ok) / duration_s) if goodput else None,
    }
    out |= _stats("ttft", [r.ttft_s for r in ok])
    out |= _stats("tpot", [t for r in ok if (t := r.tpot_s) is not None])
    out |= _stats("itl", [x for r in ok for x in r.itl_s])
    out |= _stats("e2el", [r.latency_s for r in ok])
    return out


def summarize_emulated(results: list[RequestResult]) -> dict:
    """Mean / median / p99 of the emulated TTFT, TPOT and end-to-end latency the server reported."""
    ok = [r.emulated for r in results if r.ok and r.emulated]
    out = {"clock": "emulated", "num_requests": len(ok)}
    for name, key in (("ttft", "emu_ttft_s"), ("tpot", "emu_tpot_s"), ("e2el", "emu_latency_s")):
        stats = _stats(name, [e[key] for e in ok if e.get(key) is not None])
        out |= {k: v for k, v in stats.items() if not k.startswith("std_")}
    return out


def print_table(summary: dict, title: str, clock: str, emulated: dict | None = None) -> None:
    """The summary as vLLM prints it: counts, throughputs, then a block per latency."""
    w = 50
    print(f"{' ' + title + ' (' + clock + ' clock) ':=^{w}}")
    rows = [("Successful requests:", summary["completed"], "d"), ("Failed requests:", summary["failed"], "d"),
            ("Benchmark duration (s):", summary["duration"], ".2f"),
            ("Total input tokens:", summary["total_input_tokens"], "d"),
            ("Total generated tokens:", summary["total_output_tokens"], "d"),
            ("Request throughput (req/s):", summary["request_throughput"], ".2f")]
    if summary.get("request_goodput") is not None:
        rows.append(("Request goodput (req/s):", summary["request_goodput"], ".2f"))
    rows += [("Output token throughput (tok/s):", summary["output_throughput"], ".2f"),
             ("Total token throughput (tok/s):", summary["total_token_throughput"], ".2f")]
    for label, value, fmt in rows:
        print(f"{label:<40}{value:<10{fmt}}")
    for key, head in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                      ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        print(f"{head:-^{w}}")
        for stat in ("mean", "median", "p99"):
            print(f"{f'{stat.capitalize()} {key.upper()} (ms):':<40}{summary[f'{stat}_{key}_ms']:<10.2f}")
    if emulated:
        print(f"{' emulated clock, as the server reported ':-^{w}}")
        for key in ("ttft", "tpot", "e2el"):
            for stat in ("mean", "median", "p99"):
                print(f"{f'{stat.capitalize()} {key.upper()} (us):':<40}{emulated[f'{stat}_{key}_ms'] * 1e3:<10.3f}")
    print("=" * w)
