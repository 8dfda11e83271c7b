"""A rack replayed under a request stream on the emulated clock (``python -m bench.serve --replay``).

    python -m bench.serve --replay --phantom --model llama3-8b --device atom-plus --tp 4 \\
        --instances 1,2,4,8 --request-rate 4,16,inf --num-prompts 500 --input-len 1024 --output-len 256 \\
        --routing least-outstanding --seed 0 --json rack.json --plot rack.png

The router policy and K engines run in this process as one discrete-event loop
(``rsd_runtime.replay``): requests arrive at emulated times drawn as vLLM's
benchmark draws them (Poisson, or gamma with ``--burstiness``) or from a trace;
each instance steps while it has work and jumps idle to its next arrival; the
policy decides from each instance's state at that moment. Every figure is on
the emulated clock and repeats exactly for the same seed; the metrics and their
names are those of the live benchmark (vLLM's ``benchmark_serving``).

Phantom instances run in process by default (``--backend sim``, hundreds of
steps a second); ``--backend cards`` runs every step on card processes and gives
the same figures. Without ``--phantom`` the model's real weights run on cards.

With several ``--instances`` and ``--request-rate`` values, every combination
is run: throughput against instance count at the highest rate (saturation with
``inf``) and latency against rate per instance count, each point measured. Power
is the cards' TDP plus ``--server-watts`` per server of ``--cards-per-server``.
"""
from __future__ import annotations

import math
import time

from bench.serve_metrics import RequestResult, print_table, summarize
from bench.workload import load_dataset, schedule, synthetic_prompts
from rsd_runtime.cli import add_compiler_args
from rsd_runtime.scheduler import MAX_NUM_SEQS


REPLAY_MAX_NUM_SEQS = 64


def add_args(p) -> None:
    """The replay's own options (--model, --tp, --phantom, the workload and --json are the live benchmark's)."""
    g = p.add_argument_group("replay on the emulated clock (--replay)")
    g.add_argument("--device", default="atom-plus", help="device preset or a .toml card file")
    g.add_argument("--instances", default="1", help="instances in the rack; a list (1,2,4,8) runs each")
    g.add_argument("--routing", default="least-outstanding", help="routing policy")
    g.add_argument("--backend", choices=["sim", "cards"], default="sim",
                   help="phantom instances in this process (sim) or on card processes (same figures)")
    g.add_argument("--topology", default=None, help="fabric of each instance: a preset or a .toml file")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help=f"sequences per step at most: of each replayed instance (default {REPLAY_MAX_NUM_SEQS}); "
                        "of a --launch server and of --compare-offline's LLM.generate, which also batches no "
                        f"more than --max-concurrency, as the server can (default {MAX_NUM_SEQS}, the server's)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per instance step, prefill chunks included")
    g.add_argument("--kv-utilization", type=float, default=0.9,
                   help="share of each card's memory for weights and KV cache, vLLM's gpu_memory_utilization "
                        "(phantom instances; with real weights the engine holds max-num-seqs x 1024 tokens)")
    g.add_argument("--router-hop-us", type=float, default=0.0,
                   help="emulated time a request spends in the router before it reaches its instance "
                        "(0: not modelled)")
    g.add_argument("--cards-per-server", type=int, default=8, help="cards per server, for power")
    g.add_argument("--server-watts", type=float, default=0.0, help="host power per server")
    g.add_argument("--card-price", type=float, help="USD per card, for TPS per dollar")
    g.add_argument("--plot", metavar="PNG", help="replay: throughput against instances and latency against rate; "
                   "live: each request's TTFT against its send time, by the instance that served it")
    g.add_argument("--trace", metavar="FILE.json",
                   help="write a Chrome/Perfetto trace of the first (instances, rate) replayed: every instance's "
                        "cards and host on the emulated clock")
    add_compiler_args(g)


def _list(text: str, kind, flag: str) -> list:
    try:
        out = [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes a comma-separated list, got {text!r}") from None
    if not out:
        raise ValueError(f"{flag} is empty")
    return out


def _rate(x: str) -> float:
    r = float(x)
    if not r > 0:
        raise ValueError
    return r


def make_engines(args, k: int) -> list:
    from rsd_runtime.engine import LLMEngine

    kw = dict(device=args.device, phantom=args.phantom, progress=False, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, chunk_size=args.max_num_batched_tokens,
              backend=args.backend if args.phantom else "cards", topology=args.topology, fusion=args.fusion,
              overlap=args.overlap, host_overhead=args.host_overhead,
              kv_utilization=args.kv_utilization if args.phantom else None)
    return [LLMEngine(args.model, args.tp, shm_prefix=f"rsdrack{i}", **kw) if kw["backend"] == "cards"
            else LLMEngine(args.model, args.tp, **kw) for i in range(k)]


def results_of(records) -> list[RequestResult]:
    """The live benchmark's per-request results, from a replay's records (ns on the emulated clock)."""
    out = []
    for r in records:
        ok = r.end_ns is not None and r.finish_reason not in (None, "error", "abort") and r.token_ns
        t = r.token_ns
        out.append(RequestResult(
            ok=bool(ok), prompt_len=r.prompt_len, output_len=len(t),
            ttft_s=(t[0] - r.arrival_ns) * 1e-9 if t else 0.0,
            itl_s=[(b - a) * 1e-9 for a, b in zip(t, t[1:])],
            latency_s=((r.end_ns or t[-1]) - r.arrival_ns) * 1e-9 if t else 0.0,
            error=None if ok else f"finish reason {r.finish_reason}"))
    return out


def run_one(args, k: int, rate: float, requests, spec, progress: bool = True, trace=None) -> dict:
    from tqdm import tqdm

    from rsd_runtime.replay import Replay, ReplayRequest
    from rsd_runtime.routing import get_policy

    engines = make_engines(args, k)
    try:
        for i, e in enumerate(engines if trace is not None else []):
            e.start_trace(trace, host_pid=-i, card_offset=i * args.tp)
        replay = Replay(engines, get_policy(args.routing), router_hop_ns=round(args.router_hop_us * 1e3))
        reqs = [ReplayRequest(round(at * 1e9), prompt, out) for at, prompt, out in requests]
        t0 = time.perf_counter()
        with tqdm(total=len(reqs), desc=f"{k} instance(s), {rate:g} req/s", unit="req", leave=False,
                  disable=not progress) as bar:
            records = replay.run(reqs, progress=bar.update)
        wall = time.perf_counter() - t0
    finally:
        for e in engines:
            e.close()
    end_ns = max((r.end_ns or 0) for r in records)
    summary = summarize(results_of(records), end_ns * 1e-9, goodput=args.goodput_objectives)
    cards = k * args.tp
    watts = cards * spec.tdp_watts + math.ceil(cards / args.cards_per_server) * args.server_watts
    summary.update({
        "clock": "emulated", "instances": k, "tp": args.tp, "cards": cards, "request_rate": rate,
        "routing": args.routing, "model": args.model, "device": spec.name,
        "output_throughput_per_card": summary["output_throughput"] / cards, "watts": watts,
        "output_throughput_per_watt": summary["output_throughput"] / watts if watts else None,
        "output_throughput_per_dollar": (summary["output_throughput"] / (cards * args.card_price)
                                         if args.card_price else None),
        "steps": list(replay.steps), "served_per_instance": [w.served for w in replay.workers],
        "wall_s": wall,
    })
    return summary


def run(args, goodput: dict | None) -> int:
    from devices.spec import get_spec
    from rsd_runtime.routing import POLICIES

    if args.routing not in POLICIES:
        raise ValueError(f"unknown routing policy {args.routing!r}; known: {', '.join(POLICIES)}")
    args.goodput_objectives = goodput
    if args.model is None:
        args.model = "llama3-8b" if args.phantom else "tiny"
    if args.model == "tiny":
        from rsd_runtime.tiny_model import ensure_tiny_model

        args.model = str(ensure_tiny_model())
    instances = _list(args.instances, int, "--instances")
    if any(k < 1 for k in instances):
        raise ValueError(f"--instances must be >= 1, got {args.instances}")
    rates = _list(args.request_rate, _rate, "--request-rate")
    if not 0 < args.kv_utilization <= 1:
        raise ValueError(f"--kv-utilization must be in (0, 1], got {args.kv_utilization}")
    spec = get_spec(args.device)
    specs = prompts(args)
    t0 = time.perf_counter()
    runs = []
    for k in instances:
        for rate in rates:
            times = schedule(specs, rate, args.burstiness, args.seed)
            requests = [(at, p.prompt, p.output_len) for at, p in zip(times, specs)]
            trace = None
            if args.trace and not runs:
                from rsd_runtime.trace import Trace

                trace = Trace()
            s = run_one(args, k, rate, requests, spec, progress=not args.disable_tqdm, trace=trace)
            if trace is not None:
                trace.write(args.trace)
                print(f"# wrote the trace of {k} instance(s) at {rate:g} req/s to {args.trace} (emulated clock)")
            runs.append(s)
            print_table(s, f"Replay: {k} x tp={args.tp}, {rate:g} req/s", clock="emulated")
    _scaling_table(runs)
    wall = time.perf_counter() - t0
    print(f"# wall time {wall:.1f} s (the figures above are on the emulated clock)")
    if args.json:
        import json
        import os

        config = {k: (v if not isinstance(v, float) or math.isfinite(v) else "inf") for k, v in vars(args).items()
                  if k not in ("json", "goodput_objectives")}
        best = max(runs, key=lambda r: r["output_throughput"])
        # the last run's figures at the top, under the live benchmark's keys; every run in "runs"
        doc = {"benchmark": "serve-replay", **_finite(runs[-1]), "config": config,
               "goodput_objectives_ms": args.goodput_objectives, "runs": [_finite(r) for r in runs],
               "best": _finite(best), "wall_s": wall}
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"# wrote {args.json}")
    if args.plot:
        plot(args.plot, runs, args)
    return 0


def _finite(d: dict) -> dict:
    """JSON has no infinity: an infinite rate is written "inf", as the live benchmark does."""
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}


def prompts(args) -> list:
    """The workload's prompts as token ids (text in a dataset is tokenised with the model's tokenizer)."""
    from rsd_runtime.engine import resolve_model

    _, cfg, tokenizer_path = resolve_model(args.model, args.phantom, progress=False)
    if not args.dataset:
        return synthetic_prompts(args.num_prompts, args.input_len, args.output_len, cfg.vocab_size, args.seed)
    specs = load_dataset(args.dataset, args.num_prompts)
    if any(isinstance(s.prompt, str) for s in specs):
        if tokenizer_path is None:
            raise ValueError(f"{args.dataset} has text prompts but {args.model} has no tokenizer: give token ids")
        from rsd_runtime.tokenizer import Tokenizer

        tok = Tokenizer.from_file(tokenizer_path)
        for s in specs:
            if isinstance(s.prompt, str):
                s.prompt = tok.encode(s.prompt)
    for i, s in enumerate(specs):
        if max(s.prompt) >= cfg.vocab_size:
            raise ValueError(f"{args.dataset}: request {i} holds token id {max(s.prompt)}, outside the "
                             f"vocabulary of {cfg.vocab_size}")
    return specs


def _scaling_table(runs: list[dict]) -> None:
    if len(runs) < 2:
        return
    print("\n# every point measured on the emulated clock")
    print(f"{'instances':>9} {'cards':>6} {'rate':>7} {'out tok/s':>10} {'tok/s/card':>10} {'TPS/W':>7} "
          f"{'mean TTFT':>10} {'p99 TTFT':>9} {'mean TPOT':>10} {'p99 TPOT':>9}")
    for r in runs:
        print(f"{r['instances']:>9} {r['cards']:>6} {r['request_rate']:>7g} {r['output_throughput']:>10.1f} "
              f"{r['output_throughput_per_card']:>10.1f} {r['output_throughput_per_watt'] or 0:>7.2f} "
              f"{r['mean_ttft_ms']:>8.1f}ms {r['p99_ttft_ms']:>7.1f}ms {r['mean_tpot_ms']:>8.2f}ms "
              f"{r['p99_tpot_ms']:>7.2f}ms")
    for k in sorted({r["instances"] for r in runs}):
        best = max((r for r in runs if r["instances"] == k), key=lambda r: r["output_throughput"])
        price = (f", {best['output_throughput_per_dollar']:.4f} TPS/$" if best["output_throughput_per_dollar"]
                 else "")
        print(f"# {k} instance(s): max {best['output_throughput']:.1f} output tokens/s at {best['request_rate']:g} "
              f"req/s ({best['output_throughput_per_watt'] or 0:.3f} TPS/W{price})")


def plot(path: str, runs: list[dict], args) -> None:
    from bench.common import pyplot

    plt = pyplot()
    ks = sorted({r["instances"] for r in runs})
    rates = sorted({r["request_rate"] for r in runs})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    ax = axes[0]
    top = max(rates)
    pts = sorted((r["cards"], r["output_throughput"]) for r in runs if r["request_rate"] == top)
    ax.plot([c for c, _ in pts], [t for _, t in pts], marker="o", label=f"measured at {top:g} req/s")
    if len(pts) > 1:
        c0, t0 = pts[0]
        ax.plot([c for c, _ in pts], [t0 * c / c0 for c, _ in pts], ls="--", color="gray",
                label="linear from the smallest rack (projection)")
    ax.set(xlabel="cards", ylabel="output tokens/s", title="throughput against rack size")
    ax.legend(fontsize=8)
    ax = axes[1]
    for n, k in enumerate(ks):
        rs = sorted((r for r in runs if r["instances"] == k and math.isfinite(r["request_rate"])),
                    key=lambda r: r["request_rate"])
        if rs:
            x = [r["request_rate"] for r in rs]
            ax.plot(x, [r["mean_ttft_ms"] for r in rs], marker="o", color=f"C{n}", label=f"{k} inst. mean")
            ax.plot(x, [r["p99_ttft_ms"] for r in rs], marker="x", ls=":", color=f"C{n}", label=f"{k} inst. p99")
    ax.set(xlabel="request rate (req/s)", ylabel="TTFT (ms)", title="latency against load", yscale="log")
    ax.set_xscale("log", base=2)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2, loc="upper left")
    for a in axes:
        a.grid(True, alpha=0.3)
    work = (f"{args.dataset}" if args.dataset else
            f"{args.num_prompts} requests of {args.input_len} in / {args.output_len} out")
    fig.suptitle(f"{args.model} on {args.device}, tp={args.tp}, {args.routing}, {work}; "
                 f"every point measured, emulated clock", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"# wrote {path}")
