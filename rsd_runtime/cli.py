"""rsd-launch: start emulated cards and work with them.

    rsd-launch --devices 4 status          # -smi style table, then shut down
    rsd-launch sweep                       # remove segments left by dead runs

Each sub-command registers itself in ``COMMANDS``; later layers (generate,
bench, serve) add theirs the same way.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from devices import shm
from devices.memory import fmt_bytes
from devices.spec import PRESETS
from rsd_runtime.errors import CardDied, CardError, ClusterError

COMMANDS: dict[str, tuple[str, callable, callable]] = {}  # name -> (help, add_arguments, run)


def command(name: str, help: str, add_arguments=lambda p: None):
    def register(fn):
        COMMANDS[name] = (help, add_arguments, fn)
        return fn
    return register


def cluster_from_args(args):
    from rsd_runtime.cluster import Cluster

    return Cluster(num_devices=args.devices, device=args.device, phantom=args.phantom, shm_prefix=args.shm_prefix)


def start_with_progress(cluster):
    from tqdm import tqdm

    with tqdm(total=cluster.num_devices, desc="starting cards", unit="card", file=sys.stderr,
              disable=not sys.stderr.isatty(), leave=False) as bar:
        return cluster.start(progress=bar.update)


def format_status(rows: list[dict]) -> str:
    head = f"{'card':>4}  {'pid':>7}  {'state':<8} {'memory used / capacity':>26}  {'host RSS':>10}  {'emu clock':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = "-" if r.get("memory_used") is None else (
            f"{fmt_bytes(r['memory_used'])} / {fmt_bytes(r['memory_capacity'])}")
        rss = "-" if r.get("host_rss") is None else fmt_bytes(r["host_rss"])
        clock = "-" if r.get("clock_ns") is None else f"{r['clock_ns'] / 1e3:.3f} us"
        lines.append(f"{r['card']:>4}  {r['pid'] or '-':>7}  {r['state']:<8} {mem:>26}  {rss:>10}  {clock:>12}")
        if r["state"] == "dead":
            lines.append(f"      card {r['card']} {r['how']}")
    return "\n".join(lines)


@command("status", "start the cards, print one row per card (-smi style), shut down")
def cmd_status(args) -> int:
    cluster = cluster_from_args(args)
    with start_with_progress(cluster):
        rows = cluster.status()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            spec = cluster.spec
            print(f"rsd-runtime  run {cluster.run_name}  {cluster.num_devices} x {spec.name}"
                  f"{' (phantom)' if cluster.phantom else ''}  emulated clock")
            print(format_status(rows))
    return 0


def _sweep_args(p):
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")


@command("sweep", "remove shared-memory segments left by runs whose host is gone", _sweep_args)
def cmd_sweep(args) -> int:
    report = shm.sweep(args.shm_prefix, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for run, names in report.removed.items():
        print(f"{verb} {len(names)} segments of stale run {run}")
    for run, names in report.live.items():
        print(f"kept {len(names)} segments of live run {run}")
    if report.foreign:
        print(f"error: {len(report.foreign)} segments in {shm.SHM_DIR} carry the prefix {args.shm_prefix!r} but "
              f"are not this user's rsd-runtime segments; left untouched:", file=sys.stderr)
        for name in report.foreign:
            print(f"  {shm.SHM_DIR / name}", file=sys.stderr)
        return 2
    if not (report.removed or report.live):
        print("nothing to sweep")
    return 0


def _generate_args(p):
    p.add_argument("--model", help="Hugging Face model directory; none: the built-in tiny model")
    p.add_argument("--tp", type=int, default=4, help="tensor-parallel degree: the number of cards")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", help="prompt token ids, comma separated (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 samples greedily")
    p.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens (-1: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability mass")
    p.add_argument("--seed", type=int, default=None, help="seed of the request's own generator")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype; none: the checkpoint's")


@command("generate", "generate text with a model split over --tp cards", _generate_args)
def cmd_generate(args) -> int:
    from rsd_runtime.llm import LLM
    from rsd_runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    if args.prompt_ids:
        prompts = [[int(t) for t in p.replace(" ", "").split(",") if t] for p in args.prompt_ids]
    else:
        prompts = args.prompt or ["Hello"]
    with LLM(model=args.model, tensor_parallel_size=args.tp, device=args.device, dtype=args.dtype,
             phantom=args.phantom, shm_prefix=args.shm_prefix, progress=not args.json) as llm:
        stream = None
        if not args.json and len(prompts) == 1:
            stream = lambda i, tok, text: print(printable(text), end="", flush=True)  # noqa: E731
            if isinstance(prompts[0], str):
                print(prompts[0], end="", flush=True)
        outs = llm.generate(prompts, params, on_token=stream)
        spec = llm.engine.cluster.spec.name
    if args.json:
        docs = [{**o.to_dict(), "model": args.model or "tiny-llama (built in)", "tp": args.tp, "device": spec}
                for o in outs]
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
        return 0
    for o in outs:
        if stream is None:
            shown = printable(o.text) if o.text is not None else o.token_ids
            print(f"[{o.request_id}] {o.prompt or o.prompt_token_ids}{shown}")
        else:
            print(flush=True)
        m = o.metrics
        print(f"-- {len(o.token_ids)} tokens ({o.finish_reason}) | wall: TTFT {m['ttft_s'] * 1e3:.1f} ms, "
              f"TPOT {m['tpot_s'] * 1e3:.2f} ms | emulated ({args.tp} x {spec}): TTFT {m['emu_ttft_s'] * 1e6:.1f} us, "
              f"TPOT {m['emu_tpot_s'] * 1e6:.2f} us", file=sys.stderr)
    return 0


def printable(text: str) -> str:
    """Control characters a model may emit would drive the terminal: show them as escapes."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _serve_args(p):
    def add(*flags, **kw):  # --device, --phantom, ... may already come with the common options
        if not any(f in p._option_string_actions for f in flags):
            p.add_argument(*flags, **kw)

    add("--model", help="Hugging Face model directory (a config.json is enough with --phantom); none: the "
                        "built-in tiny model")
    add("--tp", type=int, default=2, help="tensor-parallel degree: the number of cards")
    add("--host", default="127.0.0.1", help="address to listen on")
    add("--port", type=int, default=8000, help="TCP port to listen on")
    add("--served-model-name", help="the model name clients send; none: the model directory's name")
    add("--max-num-seqs", type=int, default=16, help="requests in the running batch at most")
    add("--max-num-batched-tokens", type=int, default=512, help="tokens per step at most")
    add("--max-waiting", type=int, default=None, help="refuse new requests (503) while this many wait")
    add("--restart-cards", action="store_true", help="restart cards that die and keep serving")
    add("--device", default="atom-plus", help=f"device preset: {', '.join(PRESETS)}")
    add("--phantom", action="store_true", help="cards account for memory and time but hold no bytes")
    add("--shm-prefix", default=shm.DEFAULT_PREFIX, help="prefix of the run's /dev/shm segments")


@command("serve", "serve one instance over HTTP with the OpenAI API until SIGINT or SIGTERM", _serve_args)
def cmd_serve(args) -> int:
    import signal

    def on_sigterm(signum, frame):  # unwinds card start-up too: every card stops, every segment goes
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    import uvicorn

    from rsd_runtime.async_llm import AsyncLLM
    from rsd_runtime.server.app import build_app, default_model_name
    from rsd_runtime.tiny_model import ensure_tiny_model

    if args.max_waiting is not None and args.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    model = args.model or str(ensure_tiny_model())
    llm = AsyncLLM(model, args.tp, restart_cards=args.restart_cards, max_waiting=args.max_waiting,
                   device=args.device, phantom=args.phantom, shm_prefix=args.shm_prefix,
                   max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   progress=False)
    try:
        name = args.served_model_name or default_model_name(args.model)
        app = build_app(llm, name, model)
        config = uvicorn.Config(app, host=args.host, port=args.port, access_log=args.verbose > 1,
                                log_level="info" if args.verbose else "warning", timeout_graceful_shutdown=2)
        print(f"rsd-launch: serving {name} on http://{args.host}:{args.port}/v1 ({args.tp} x {args.device}"
              f"{', phantom' if args.phantom else ''})", file=sys.stderr, flush=True)
        uvicorn.Server(config).run()
    finally:
        llm.close()
    return 0


BENCHMARKS = {"collectives": "bench.collectives", "launch": "bench.launch", "decode": "bench.decode",
              "inference": "bench.inference", "serve": "bench.serve"}


def _bench_args(p):
    p.add_argument("benchmark", choices=list(BENCHMARKS), help="which benchmark program to run")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="its options (see: rsd-launch bench NAME --help)")


@command("bench", "run a benchmark program (collectives, inference, decode, launch, serve); options after its name go "
                  "to it", _bench_args)
def cmd_bench(args) -> int:
    import importlib

    return importlib.import_module(BENCHMARKS[args.benchmark]).main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rsd-launch",
        description="Start N emulated neural-engine cards (one OS process each) and run a job on them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common(p, defaults=True)
    from rsd_runtime import topo_cli  # registers `topo`; imported here, as it imports this module
    COMMANDS.setdefault("topo", topo_cli.COMMAND)  # when this module runs as __main__
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name != "bench":
            _common(sp, defaults=False)  # accepted after the command too: rsd-launch generate --json
        add_arguments(sp)
    return p


def _common(p, defaults: bool) -> None:
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    p.add_argument("--devices", "-n", type=int, default=d(4), metavar="N", help="number of cards")
    p.add_argument("--device", default=d("atom-plus"), help=f"device preset: {', '.join(PRESETS)}")
    p.add_argument("--phantom", action="store_true", default=d(False),
                   help="cards account for memory and time but hold no bytes")
    p.add_argument("--shm-prefix", default=d(shm.DEFAULT_PREFIX), help="prefix of the run's /dev/shm segments")
    p.add_argument("--json", action="store_true", default=d(False), help="machine-readable output")
    p.add_argument("-v", "--verbose", action="count", default=d(0), help="more logging (-vv for debug)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="rsd-launch: %(message)s")
    try:
        return COMMANDS[args.command][2](args)
    except KeyboardInterrupt:
        print("rsd-launch: interrupted; cards shut down", file=sys.stderr)
        return 130
    except (ClusterError, CardDied, CardError, ValueError, shm.SegmentError, MemoryError) as exc:
        print(f"rsd-launch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
