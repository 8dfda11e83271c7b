"""Serving benchmark: a live OpenAI-compatible server measured as vLLM's ``benchmark_serving`` does.

    python -m bench.serve --launch --tp 2 --num-prompts 64 --request-rate inf --max-concurrency 16 \\
        --input-len 32 --output-len 64 --compare-offline --json results/serve.json
    python -m bench.serve --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rate 8 \\
        --burstiness 0.5 --dataset prompts.jsonl --goodput ttft:50 tpot:20 --json results/serve.json

Streaming clients (one keep-alive connection each, ``bench.sse_client``: asyncio and httptools, so that
the client takes little of the CPU the server needs) send ``/v1/completions`` requests at Poisson or
gamma arrival times (``bench.workload``), at most ``--max-concurrency`` at once, with
``ignore_eos`` so that each generates exactly its output length. TTFT, ITL and end-to-end
latency are read on the wall clock as chunks arrive; the emulated timings each response
carries are summarised beside them (``bench.serve_metrics``). ``--compare-offline`` then runs
``LLM.generate`` on the same prompts in this process and prints the ratio of output tokens/s.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time

import httpx

from bench import rack
from bench.serve_metrics import RequestResult, parse_goodput, print_table, summarize, summarize_emulated
from bench.sse_client import Pool
from bench.workload import PromptSpec, load_dataset, schedule, synthetic_prompts
from rsd_runtime.scheduler import MAX_NUM_SEQS


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="the server, e.g. http://127.0.0.1:8000")
    target.add_argument("--launch", action="store_true", help="start a server (rsd-launch serve) for the run")
    target.add_argument("--replay", action="store_true",
                        help="no server: replay a rack of --instances in this process on the emulated clock "
                             "(bench.rack)")
    p.add_argument("--model", help="model directory: of the launched server, and of --compare-offline; "
                                   "none: the built-in tiny model")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel degree of the launched server / offline run")
    p.add_argument("--phantom", action="store_true", help="launch the server on phantom cards")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="the launched server's --stream-interval (a chunk every N tokens)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", default="inf",
                   help="requests per second (inf: all at once); with --replay a list (4,16,inf) runs each")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--input-len", type=int, default=32, help="synthetic prompt length (tokens)")
    p.add_argument("--output-len", type=int, default=64, help="synthetic output length (tokens)")
    p.add_argument("--dataset", help="JSONL file: {prompt, output_len[, arrival_s]} per line")
    p.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="objectives, e.g. ttft:50 tpot:10 e2el:500")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-offline", action="store_true",
                   help="also run LLM.generate on the same prompts and print the tokens/s ratio")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --compare-offline: server and offline passes alternate this many times, both kept "
                        "running, and the median ratio is reported (a busy host's noise is shared by each pair)")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    rack.add_args(p)
    args = p.parse_args(argv)
    if not args.replay:
        try:
            args.request_rate = float(args.request_rate)
        except ValueError:
            p.error(f"--request-rate takes one number (a list only with --replay), got {args.request_rate!r}")
    if args.num_prompts < 1:
        p.error(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        p.error(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.tp < 1:
        p.error(f"--tp must be >= 1, got {args.tp}")
    if args.max_num_seqs is None:
        args.max_num_seqs = rack.REPLAY_MAX_NUM_SEQS if args.replay else MAX_NUM_SEQS
    if args.max_num_seqs < 1:
        p.error(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    if args.stream_interval < 1:
        p.error(f"--stream-interval must be >= 1, got {args.stream_interval}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


# -- one request -------------------------------------------------------------------------------
async def send(pool: Pool, model: str, spec: PromptSpec) -> RequestResult:
    body = {"model": model, "prompt": spec.prompt, "max_tokens": spec.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult(ok=False, prompt_len=spec.prompt_len or 0)
    start = time.perf_counter()
    last = None
    pending = b""
    raw = []  # the body of a response that is not a stream (an error)

    def on_body(data: bytes, now: float) -> None:
        nonlocal last, pending
        if res.error:
            return
        raw.append(data)
        *events, pending = (pending + data).split(b"\n\n")  # whatever has arrived: one event or several
        for event in events:
            if not event.startswith(b"data: "):
                continue
            if b'"finish_reason":null' in event:  # a token event: only its time matters, no parsing
                last = _token(res, start, last, now)
                continue
            if event == b"data: [DONE]":
                break
            obj = json.loads(event[6:])
            if "error" in obj:
                res.error = obj["error"].get("message", "error")
                return
            if obj.get("choices"):
                last = _token(res, start, last, now)
                res.emulated = obj["choices"][0].get("timings")
            if obj.get("usage"):
                res.output_len = obj["usage"]["completion_tokens"]
                res.prompt_len = obj["usage"]["prompt_tokens"]

    try:
        status, headers = await pool.stream("/v1/completions", body, on_body)
    except (OSError, asyncio.TimeoutError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.instance = headers.get("x-rsd-instance")
    if status != 200:
        res.error = f"HTTP {status}: {b''.join(raw).decode(errors='replace')[:200]}"
        return res
    if res.error:
        return res
    res.latency_s = (last or time.perf_counter()) - start
    res.ok = last is not None
    if not res.ok:
        res.error = "the stream ended without a token"
    return res


def _run_loop(coro):
    """Run the clients on uvloop (libuv's event loop, which uvicorn uses too) where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _token(res: RequestResult, start: float, last: float | None, now: float) -> float:
    if last is None:
        res.ttft_s = now - start
    else:
        res.itl_s.append(now - last)
    return now


# -- the run -------------------------------------------------------------------------------------
async def run(base_url: str, model: str, specs: list[PromptSpec], times: list[float], max_concurrency: int | None,
              progress: bool) -> tuple[list[RequestResult], float]:
    from tqdm import tqdm

    limit = max_concurrency or len(specs)
    sem = asyncio.Semaphore(limit)
    client = Pool(base_url, limit)
    try:
        warm = await send(client, model, PromptSpec(specs[0].prompt, 2))
        if not warm.ok:
            raise ValueError(f"the warm-up request failed: {warm.error}")
        bar = tqdm(total=len(specs), desc="requests", unit="req", file=sys.stderr, disable=not progress)

        async def one(spec, at):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            async with sem:
                sent = time.perf_counter() - t0
                r = await send(client, model, spec)
                r.sent_s = sent
            bar.update(1)
            return r

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(s, at) for s, at in zip(specs, times)))
        duration = time.perf_counter() - t0
        bar.close()
    finally:
        client.close()
    return list(results), duration


class CpuMeter:
    """CPU seconds (user + system) of process groups, for "where does the CPU go" per pass."""

    def __init__(self, server_pid: int | None):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.server = psutil.Process(server_pid) if server_pid else None

    def _cpu(self, procs) -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except self.psutil.Error:
                pass
        return total

    def sample(self) -> dict[str, float]:
        mine = self.me.children(recursive=True)
        if self.server is not None:
            theirs = {p.pid for p in self.server.children(recursive=True)} | {self.server.pid}
            mine = [p for p in mine if p.pid not in theirs]
        out = {"bench": self._cpu([self.me]), "bench_cards": self._cpu(mine)}
        if self.server is not None:
            out["server"] = self._cpu([self.server])
            out["server_cards"] = self._cpu(self.server.children(recursive=True))
        return out

    @staticmethod
    def per_ktok(before: dict, after: dict, tokens: int) -> dict[str, float]:
        """CPU ms per 1,000 output tokens of each group between two samples."""
        return {k: round((after[k] - before[k]) * 1e6 / max(tokens, 1), 1) for k in after}


class Offline:
    """LLM.generate on the same prompts in this process, kept up between passes."""

    def __init__(self, args, specs: list[PromptSpec]):
        from rsd_runtime.llm import LLM
        from rsd_runtime.sampling import SamplingParams

        self.specs = specs
        self.params = [SamplingParams(max_tokens=s.output_len, temperature=0, ignore_eos=True) for s in specs]
        # the server never runs more than --max-concurrency requests at once: neither does the offline batch
        self.max_num_seqs = min(args.max_num_seqs, args.max_concurrency or args.max_num_seqs)
        self.llm = LLM(args.model, tensor_parallel_size=args.tp, phantom=args.phantom, progress=False,
                       max_num_seqs=self.max_num_seqs, shm_prefix="rsdbs" + str(os.getpid()))
        self.llm.generate([specs[0].prompt], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up

    def run(self) -> dict:
        """One pass: output tokens per second, wall clock."""
        steps = self.llm.engine.stats.steps
        t0 = time.perf_counter()
        outs = self.llm.generate([s.prompt for s in self.specs], self.params)
        duration = time.perf_counter() - t0
        tokens = sum(len(o.token_ids) for o in outs)
        return {"duration": duration, "total_output_tokens": tokens, "output_throughput": tokens / duration,
                "max_num_seqs": self.max_num_seqs,
                "tokens_per_step": round(tokens / max(self.llm.engine.stats.steps - steps, 1), 2)}

    def close(self) -> None:
        self.llm.close()


def engine_steps(base_url: str) -> int:
    """The server's count of engine steps (``rsd:engine_steps_total`` in /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(base_url + "/metrics", timeout=10)
    r.raise_for_status()
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.name == "rsd:engine_steps_total":
                return int(sample.value)
    return 0


def model_info(base_url: str) -> dict:
    r = httpx.get(base_url + "/v1/models", timeout=10)
    r.raise_for_status()
    return r.json()["data"][0]


def main(argv=None) -> int:
    args = parse_args(argv)
    goodput = parse_goodput(args.goodput)
    if args.replay:
        return rack.run(args, goodput)
    server = None
    if args.launch:
        from rsd_runtime.server.launch import ServerProcess

        server = ServerProcess(model=args.model, tp=args.tp, phantom=args.phantom,
                               extra_args=["--stream-interval", str(args.stream_interval),
                                           "--max-num-seqs", str(args.max_num_seqs)]).start()
    try:
        base_url = (server.base_url if server else args.base_url).rstrip("/")
        try:
            info = model_info(base_url)
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{base_url}/v1/models did not name a model: {exc}") from None
        if args.dataset:
            specs = load_dataset(args.dataset, args.num_prompts)
        else:
            specs = synthetic_prompts(args.num_prompts, args.input_len, args.output_len, info["vocab_size"],
                                      args.seed)
        times = schedule(specs, args.request_rate, args.burstiness, args.seed)
        load_before = os.getloadavg()
        offline = Offline(args, specs) if args.compare_offline else None
        try:
            results, duration = _run_loop(run(base_url, info["id"], specs, times, args.max_concurrency,
                                                not args.disable_tqdm))
            rounds = []
            meter = CpuMeter(server.proc.pid if server else None) if offline else None

            def server_pass() -> dict:
                cpu0, steps0 = meter.sample(), engine_steps(base_url)
                again, took = _run_loop(run(base_url, info["id"], specs, times, args.max_concurrency, False))
                cpu1, steps1 = meter.sample(), engine_steps(base_url)
                tokens = sum(r.output_len for r in again)
                return {"server_output_throughput": summarize(again, took, goodput)["output_throughput"],
                        "server_tokens_per_step": round(tokens / max(steps1 - steps0, 1), 2),
                        "cpu": meter.per_ktok(cpu0, cpu1, tokens)}

            def offline_pass() -> dict:
                cpu0 = meter.sample()
                off = offline.run()
                return {**off, "cpu": meter.per_ktok(cpu0, meter.sample(), off["total_output_tokens"])}

            for i in range(args.rounds if offline else 0):
                # odd rounds run offline first: a host whose speed drifts favours neither side
                if i % 2:
                    off = offline_pass()
                    srv = server_pass()
                else:
                    srv = server_pass()
                    off = offline_pass()
                server_cpu, offline_cpu = srv.pop("cpu"), off.pop("cpu")
                rounds.append({**srv, **off,
                               "server_over_offline": srv["server_output_throughput"] / off["output_throughput"],
                               "cpu_ms_per_1k_tokens": {"server_pass": server_cpu, "offline_pass": offline_cpu}})
        finally:
            if offline is not None:
                offline.close()
    finally:
        if server is not None:
            server.stop()
    summary = summarize(results, duration, goodput)
    emulated = summarize_emulated(results)
    print_table(summary, "Serving Benchmark Result", "wall", emulated)
    failures = [r.error for r in results if not r.ok]
    if failures:
        print(f"first failure: {failures[0]}", file=sys.stderr)
    doc = {"backend": "rsd-runtime", "base_url": base_url, "model_id": info["id"], "num_prompts": len(specs),
           "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
           "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "seed": args.seed,
           "goodput_objectives_ms": goodput, **summary, "clock": "wall", "emulated": emulated,
           "loadavg": {"before": load_before, "after": os.getloadavg()}, "cpus": os.cpu_count()}
    if rounds:
        ratio = statistics.median(r["server_over_offline"] for r in rounds)
        doc["offline"] = {"rounds": rounds, "clock": "wall", "server_over_offline": ratio,
                          "loadavg": os.getloadavg()}
        for i, r in enumerate(rounds):
            print(f"round {i}: output tokens/s, wall clock: server {r['server_output_throughput']:.1f}, "
                  f"LLM.generate {r['output_throughput']:.1f}, ratio {r['server_over_offline']:.3f}")
            print(f"  output tokens per engine step: server {r['server_tokens_per_step']:.2f}, "
                  f"LLM.generate {r['tokens_per_step']:.2f} (max_num_seqs {r['max_num_seqs']})")
            cpu = r["cpu_ms_per_1k_tokens"]
            print("  CPU ms per 1k output tokens: " + "; ".join(
                f"{name.replace('_', ' ')}: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu[name].items())
                for name in ("server_pass", "offline_pass")))
        print(f"server / LLM.generate output tokens/s, wall clock: median ratio {ratio:.3f} over {len(rounds)} "
              f"round(s)  (loadavg {_load()} on {os.cpu_count()} cpus)")
    served = {}
    for r in results:
        if r.instance:
            served[r.instance] = served.get(r.instance, 0) + 1
    if served:
        doc["served_per_instance"] = dict(sorted(served.items()))
        print("served per instance: " + ", ".join(f"{k} {v}" for k, v in sorted(served.items())))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        from bench.serve_plot import plot_live

        plot_live(args.plot, results, f"{base_url}, {info['id']}, {args.request_rate:g} req/s")
    return 0 if not failures else 1


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    from bench.common import entry

    entry(main, "python -m bench.serve")
