"""rsd-launch: start emulated cards and work with them.

    rsd-launch --devices 4 status          # -smi style table, then shut down
    rsd-launch generate --tp 4 --prompt "Hello"
    rsd-launch sweep                       # remove segments and run directories left by dead runs

Each sub-command registers itself in ``COMMANDS`` with the ``@command`` decorator: one
function adds its own options to its parser, and it names the groups of shared options
(``SHARED``) that mean something to it.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time

from devices import shm
from devices.memory import fmt_bytes
from devices.spec import PRESETS
from rsd_runtime.errors import CardDied, CardError, ClusterError, EngineDeadError
from rsd_runtime.scheduler import MAX_NUM_SEQS

log = logging.getLogger("rsd.cli")

COMMANDS: dict[str, tuple[str, callable, callable, tuple[str, ...]]] = {}  # name -> (help, add_arguments, run, shared)

# Options that several sub-commands share, by group: each group is a parent parser, and a
# sub-command takes the groups it names. They may also come before the sub-command (rsd-launch
# --devices 4 status); one that the sub-command does not take is refused, not silently ignored.
SHARED = {
    "devices": [(("--devices", "-n"), dict(type=int, metavar="N", help="number of cards"), 4)],
    "device": [
        (("--device",), dict(metavar="PRESET", help=f"device preset ({', '.join(PRESETS)}) or a .toml file"),
         "atom-plus"),
        (("--phantom",), dict(action="store_true", help="cards account for memory and time but hold no bytes"),
         False),
    ],
    "shm": [(("--shm-prefix",), dict(metavar="PREFIX", help="prefix of the run's /dev/shm segments"),
             shm.DEFAULT_PREFIX)],
    "json": [(("--json",), dict(action="store_true", help="machine-readable output"), False)],
}
ALL_SHARED = tuple(SHARED)


def command(name: str, help: str, add_arguments=lambda p: None, shared: tuple[str, ...] = ALL_SHARED):
    """Register sub-command ``name``: ``add_arguments(parser)`` adds its own options, ``shared`` names
    the groups of SHARED it takes."""
    def register(fn):
        COMMANDS[name] = (help, add_arguments, fn, tuple(shared))
        return fn
    return register


def cluster_from_args(args):
    from rsd_runtime.cluster import Cluster

    return Cluster(num_devices=args.devices, device=args.device, phantom=args.phantom, shm_prefix=args.shm_prefix)


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


@command("status", "start the cards, print one row per card (-smi style), shut down",
         shared=("devices", "device", "shm", "json"))
def cmd_status(args) -> int:
    from rsd_runtime.cluster import start_with_bar

    cluster = cluster_from_args(args)
    with start_with_bar(cluster):
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


@command("sweep", "remove shared-memory segments and run directories left by runs whose host is gone", _sweep_args,
         shared=("shm",))
def cmd_sweep(args) -> int:
    report = shm.sweep(args.shm_prefix, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for run, names in report.removed.items():
        print(f"{verb} {len(names)} segments of stale run {run}")
    for path in report.dirs:
        print(f"{verb} run directory {path} (its host is gone)")
    for run, names in report.live.items():
        print(f"kept {len(names)} segments of live run {run}")
    if report.foreign:
        print(f"error: {len(report.foreign)} segments in {shm.SHM_DIR} carry the prefix {args.shm_prefix!r} but "
              f"are not this user's rsd-runtime segments; left untouched:", file=sys.stderr)
        for name in report.foreign:
            print(f"  {shm.SHM_DIR / name}", file=sys.stderr)
        return 2
    if not (report.removed or report.live or report.dirs):
        print("nothing to sweep")
    return 0


def token_ids(text: str) -> list[int]:
    """--prompt-ids: whole numbers separated by commas."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        ids = None
    if not ids:
        raise argparse.ArgumentTypeError(f"expected token ids separated by commas, like 1,2,3; got {text!r}")
    return ids


def _generate_args(p):
    p.add_argument("--model", help="Hugging Face model directory, or with --phantom a shape preset (llama3-8b, "
                                   "...); none: the built-in tiny model")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel degree: the number of cards (none: --devices if given, else 4)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help='prompt text (repeat for a batch; none: "Hello")')
    src.add_argument("--prompt-ids", action="append", type=token_ids, metavar="IDS",
                     help="prompt token ids, comma separated, like 1,2,3 (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate per prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 samples greedily")
    p.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens (-1: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability mass")
    p.add_argument("--seed", type=int, default=None, help="seed of the request's own generator")
    p.add_argument("--stop", action="append", help="stop string (repeatable); the output ends before it")
    p.add_argument("--ignore-eos", action="store_true",
                   help="go on past the end-of-sequence token, up to --max-new-tokens")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype; none: the checkpoint's")
    p.add_argument("--inject", action="append", default=[], metavar="FAULT",
                   help="inject a fault (repeatable): kill:card=C:step=K, pause:card=C:step=K:seconds=T, "
                        "link:src=A:dst=B:bw=F:lat_us=L:from_ns=T (bandwidth x F, latency + L from emulated T)")
    add_compiler_args(p)
    p.add_argument("--trace", metavar="FILE.json",
                   help="write a Chrome/Perfetto trace of the run on the emulated clock")
    chk = p.add_mutually_exclusive_group()
    chk.add_argument("--check-weights", dest="check_weights", action="store_true", default=None,
                     help="read every tensor first and name the first holding NaN or Inf (default: only "
                          "checkpoints up to 1 GiB)")
    chk.add_argument("--no-check-weights", dest="check_weights", action="store_false")


def _checked(text: str, check) -> str:
    """``text`` if ``check`` accepts it; its ValueError becomes argparse's error for the flag."""
    try:
        check(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def overlap_arg(text: str):
    from rsd_runtime.pipelining import parse_overlap

    return _checked(text, parse_overlap)


def host_arg(text: str):
    from rsd_runtime.host_spec import get_host

    return _checked(text, get_host)


def add_compiler_args(p) -> None:
    """--fusion, --overlap, --host-overhead: the compiler's choices and the host's costs."""
    from devices.fusion import FUSIONS
    from rsd_runtime.host_spec import HOSTS

    p.add_argument("--fusion", choices=FUSIONS, default="none",
                   help="none: every op alone; ops: the usual fused groups; layer: a layer's ops in one launch, "
                        "intermediates in on-chip SRAM")
    p.add_argument("--overlap", type=overlap_arg, default="off", metavar="off|on|K",
                   help="layer pipelining: on lets the compiler cut steps into row chunks whose all_reduce "
                        "hides behind the next chunk (when that is faster); K forces K chunks")
    p.add_argument("--host-overhead", type=host_arg, default="off", metavar="off|on|HOST",
                   help=f"charge the host's scheduling, sampling, detokenising and API work (on: "
                        f"xeon-python; presets: {', '.join(HOSTS)})")


SAMPLING_FLAGS = {"max_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                  "top_p": "--top-p", "seed": "--seed", "stop": "--stop"}


@command("generate", "generate text with a model split over --tp cards", _generate_args)
def cmd_generate(args) -> int:
    from devices.faults import FaultPlan

    # every flag is checked before torch and the engine load: a mistake is named at once
    tp_from_devices(args)
    faults = FaultPlan.parse(args.inject)
    params = sampling_params(args)
    prompts = args.prompt_ids or args.prompt or ["Hello"]
    check_tokenizer(args.model, args.phantom, prompts)

    import psutil

    from rsd_runtime.llm import LLM
    from rsd_runtime.phases import phase

    with LLM(model=args.model, tensor_parallel_size=args.tp, device=args.device, dtype=args.dtype,
             phantom=args.phantom, shm_prefix=args.shm_prefix, progress=not args.json,
             check_weights=args.check_weights, fusion=args.fusion, overlap=args.overlap,
             host_overhead=args.host_overhead) as llm:
        engine = llm.engine
        trace = None
        if args.trace:
            from rsd_runtime.trace import Trace

            trace = Trace()
            engine.start_trace(trace)
        warn_capped(engine, prompts, params)
        engine.cluster.apply_faults(faults)
        for line in faults.describe():
            print(f"rsd-launch: injected: {line}", file=sys.stderr)
        stream = None
        if not args.json and len(prompts) == 1 and not args.phantom:
            stream = start_stream(prompts[0], has_text=llm.tokenizer is not None)
        times = {}
        with phase(log, f"generate {len(prompts)} prompt(s)", times, "generate_s"):
            outs = llm.generate(prompts, params, on_token=stream)
            if stream is not None:
                print(flush=True)  # the streamed line ends
        spec = engine.cluster.spec.name
        if trace is not None:
            trace.write(args.trace)
            print(f"rsd-launch: wrote the trace to {args.trace} (emulated clock; open it in ui.perfetto.dev)",
                  file=sys.stderr)
    times.update(engine.timings, total_s=time.time() - psutil.Process().create_time())  # imports included
    if args.json:
        print(json.dumps([{**o.to_dict(), "model": args.model or "tiny-llama (built in)", "tp": args.tp,
                           "device": spec, "phantom": args.phantom} for o in outs], indent=2))
        return 0
    for o in outs:
        if stream is None:
            print_output(o, phantom=args.phantom, label=len(outs) > 1)
        print_summary(o, f"{args.tp} x {spec}", label=len(outs) > 1)
    print(f"-- wall: read model {times['read_s']:.2f} s, start {args.tp} cards {times['start_s']:.2f} s, "
          f"load {times['load_s']:.2f} s, generate {times['generate_s']:.2f} s, shut down "
          f"{times['shutdown_s']:.2f} s; total {times['total_s']:.2f} s", file=sys.stderr)
    return 0


def tp_from_devices(args) -> None:
    """generate runs one card per tensor-parallel rank: --devices may say so, but not otherwise."""
    if args.tp is None:
        args.tp = args.devices if "devices" in args.given else 4
    elif "devices" in args.given and args.devices != args.tp:
        raise ValueError(f"--devices {args.devices} disagrees with --tp {args.tp}: generate runs one card per "
                         f"tensor-parallel rank; give --tp alone")
    args.devices = args.tp


def sampling_params(args):
    """The request's SamplingParams; a bad value is named by its flag."""
    from rsd_runtime.sampling_params import SamplingParams

    values = {"max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
              "top_p": args.top_p, "seed": args.seed, "stop": args.stop, "ignore_eos": args.ignore_eos}
    try:
        return SamplingParams(**values)
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        if field not in SAMPLING_FLAGS:
            raise
        raise ValueError(f"{SAMPLING_FLAGS[field]} {rest}") from None


def check_tokenizer(model: str | None, phantom: bool, prompts: list) -> None:
    """Text prompts need a tokenizer: say so before any card starts."""
    from pathlib import Path

    from rsd_runtime.model_config import MODEL_PRESETS
    from rsd_runtime.tokenizer import tokenizer_file

    if model is None or not any(isinstance(p, str) for p in prompts):
        return
    if (phantom and model in MODEL_PRESETS) or (Path(model).is_dir() and tokenizer_file(model) is None):
        what = "the shape preset" if model in MODEL_PRESETS else "the model directory"
        raise ValueError(f"{what} {model!r} has no tokenizer (tokenizer.json), so it takes no text: give the "
                         f"prompt as token ids, like --prompt-ids 1,2,3")


def warn_capped(engine, prompts: list, params) -> None:
    """Say so when a request cannot get the tokens asked for: it ends at the context or the KV cache."""
    for n, prompt in enumerate(prompts):
        room = engine.max_len - len(engine.validate(prompt, params))
        if params.max_tokens > room:
            which = "prompt" if len(prompts) == 1 else f"prompt {n}"
            print(f"rsd-launch: warning: {which} gets at most {room} new tokens, not --max-new-tokens "
                  f"{params.max_tokens}: a request holds {engine.max_len} tokens (context "
                  f"{engine.max_model_len}, KV cache {engine.scheduler.max_len})", file=sys.stderr)


def start_stream(prompt, has_text: bool):
    """Echo the prompt and return the callback that prints each new token as it comes."""
    if has_text and isinstance(prompt, str):
        print(printable(prompt), end="", flush=True)
        return lambda i, tok, text: print(printable(text), end="", flush=True)
    print(f"prompt ids {prompt} -> output ids", end="", flush=True)
    return lambda i, tok, text: print(f" {tok}", end="", flush=True)


def print_output(o, phantom: bool, label: bool) -> None:
    tag = f"[{o.request_id}] " if label else ""
    prompt = printable(o.prompt, escape_newlines=True) if o.prompt is not None else f"ids {o.prompt_token_ids}"
    print(f"{tag}prompt: {prompt}")
    if phantom:
        shown = f"{len(o.token_ids)} placeholder tokens (phantom cards do no math; the timings are real)"
    elif o.text:
        shown = printable(o.text, escape_newlines=True)
    elif o.text is not None:  # tokens that decode to no text yet (part of a character)
        shown = f"no text; ids {o.token_ids}"
    else:
        shown = f"ids {o.token_ids}"
    print(f"{tag}output: {shown}", flush=True)


def print_summary(o, cards: str, label: bool) -> None:
    m = o.metrics
    tag = f"[{o.request_id}] " if label else ""
    print(f"{tag}-- {len(o.token_ids)} tokens ({o.finish_reason}) | wall: TTFT {m['ttft_s'] * 1e3:.1f} ms, "
          f"TPOT {m['tpot_s'] * 1e3:.2f} ms | emulated ({cards}): TTFT {m['emu_ttft_s'] * 1e6:.1f} us, "
          f"TPOT {m['emu_tpot_s'] * 1e6:.2f} us", file=sys.stderr, flush=True)


def printable(text: str, escape_newlines: bool = False) -> str:
    """Control characters a model may emit would drive the terminal: show them as escapes (newlines
    too, when the text shares a labelled line)."""
    keep = "\t" if escape_newlines else "\n\t"
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


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
    coe = p.add_argument_group("a Composition of Experts: many models on the same cards (--models)")
    coe.add_argument("--models", nargs="+", metavar="NAME=PATH",
                     help="experts sharing the cards, each a checkpoint (or with --phantom a shape preset); "
                          "a request names one, or the router")
    coe.add_argument("--router", metavar="TOML", help="router of --models: rules and/or a classifier model")
    coe.add_argument("--staging", choices=["ddr", "host"], default=None,
                     help="where every expert waits: the cards' DDR tier, or host memory (default: DDR if the "
                          "device has one)")
    add("--max-num-seqs", type=int, default=MAX_NUM_SEQS, help="requests in the running batch at most")
    add("--max-num-batched-tokens", type=int, default=512, help="tokens per step at most")
    add("--max-waiting", type=int, default=None, help="refuse new requests (503) while this many wait")
    add("--stream-interval", type=int, default=1,
        help="a stream's chunks go out every N tokens (the first token and the last at once): fewer events "
             "per token when the host's cores are the bottleneck, as vLLM's --stream-interval")
    add("--restart-cards", action="store_true", help="restart cards that die and keep serving")
    add("--device", default="atom-plus", help=f"device preset: {', '.join(PRESETS)}")
    add("--phantom", action="store_true", help="cards account for memory and time but hold no bytes")
    add("--shm-prefix", default=shm.DEFAULT_PREFIX, help="prefix of the run's /dev/shm segments")
    add_compiler_args(p)
    rack = p.add_argument_group("a rack: several instances behind a router (--instances K)")
    rack.add_argument("--instances", type=int, default=1,
                      help="instance servers to start, each with --tp cards of its own, behind a router on --port")
    from rsd_runtime.routing import POLICIES

    rack.add_argument("--routing", default="least-outstanding", choices=list(POLICIES),
                      help="routing policy of the rack's router (default: least-outstanding)")
    add_router_options(rack)


def parse_models(items: list[str]) -> dict[str, str]:
    """``NAME=PATH`` items of --models as a dict; a bad item is named."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--models takes NAME=PATH items, got {item!r}")
        if name in out:
            raise ValueError(f"--models names {name!r} twice")
        out[name] = path
    return out


def _coe_server(args, models: dict[str, str]):
    from rsd_runtime.async_llm import AsyncLLM
    from rsd_runtime.coe_engine import CoEEngine

    engine = CoEEngine(models, args.tp, device=args.device, phantom=args.phantom,
                       staging=args.staging, router=args.router, shm_prefix=args.shm_prefix,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       progress=False)
    return AsyncLLM(engine=engine, restart_cards=args.restart_cards, max_waiting=args.max_waiting,
                    stream_interval=args.stream_interval)


@command("serve", "serve one instance over HTTP with the OpenAI API until SIGINT or SIGTERM", _serve_args,
         shared=("device", "shm"))
def cmd_serve(args) -> int:
    import gc
    import signal

    def on_sigterm(signum, frame):  # unwinds card start-up too: every card stops, every segment goes
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    if args.max_waiting is not None and args.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if args.stream_interval < 1:
        raise ValueError(f"--stream-interval must be >= 1, got {args.stream_interval}")
    models = parse_models(args.models) if args.models else None
    if models:
        if args.model or args.instances != 1:
            raise ValueError(f"--models replaces {'--model' if args.model else '--instances'}")
    elif args.router or args.staging:
        raise ValueError(f"{'--router' if args.router else '--staging'} goes with --models")

    import uvicorn

    from rsd_runtime.async_llm import AsyncLLM
    from rsd_runtime.server.app import build_app, default_model_name, with_raw_send
    from rsd_runtime.tiny_model import ensure_tiny_model

    if args.instances != 1 and not models:
        from rsd_runtime.rack import serve_rack

        return serve_rack(args, router_options(args))
    if models:
        llm, model = _coe_server(args, models), None
    else:
        model = args.model or str(ensure_tiny_model())
        llm = AsyncLLM(model, args.tp, restart_cards=args.restart_cards, max_waiting=args.max_waiting,
                       stream_interval=args.stream_interval,
                       device=args.device, phantom=args.phantom, shm_prefix=args.shm_prefix,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       progress=False, fusion=args.fusion, overlap=args.overlap, host_overhead=args.host_overhead)
    try:
        name = args.served_model_name or (",".join(llm.engine.model_names) if args.models
                                          else default_model_name(args.model))
        app = build_app(llm, name, model)
        gc.collect()  # the start-up heap lives as long as the server: keep old-generation collections off it
        gc.freeze()
        config = uvicorn.Config(with_raw_send(app), host=args.host, port=args.port, access_log=args.verbose > 1,
                                log_level="info" if args.verbose else "warning", timeout_graceful_shutdown=2)
        print(f"rsd-launch: serving {name} on http://{args.host}:{args.port}/v1 ({args.tp} x {args.device}"
              f"{', phantom' if args.phantom else ''})", file=sys.stderr, flush=True)
        uvicorn.Server(config).run()
    finally:
        llm.close()
    return 0


BENCHMARKS = {"collectives": "bench.collectives", "launch": "bench.launch", "decode": "bench.decode",
              "inference": "bench.inference", "serve": "bench.serve", "coe": "bench.coe"}


def _bench_args(p):
    p.add_argument("benchmark", choices=list(BENCHMARKS), help="which benchmark program to run")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="its options (see: rsd-launch bench NAME --help)")


def _router_args(p):
    from rsd_runtime.routing import POLICIES

    p.add_argument("--backend", action="append", required=True, metavar="URL",
                   help="an instance server's base URL, e.g. http://127.0.0.1:8001 (repeat for each)")
    p.add_argument("--routing", default="least-outstanding", choices=list(POLICIES),
                   help="routing policy (default: least-outstanding)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port of the router (default: 8000)")
    add_router_options(p)


def add_router_options(p):
    from rsd_runtime import router

    p.add_argument("--health-interval", type=float, default=1.0, metavar="S",
                   help="seconds between health checks of each instance (default: 1)")
    p.add_argument("--health-timeout", type=float, default=2.0, metavar="S",
                   help="seconds a health check may take before the instance counts as down (default: 2)")
    p.add_argument("--allowed-fails", type=int, default=router.ALLOWED_FAILS, metavar="N",
                   help=f"failed requests per minute before an instance cools down (default: {router.ALLOWED_FAILS})")
    p.add_argument("--cooldown", type=float, default=router.COOLDOWN_S, metavar="S",
                   help=f"seconds an instance is skipped after too many failures (default: {router.COOLDOWN_S:g})")
    p.add_argument("--num-retries", type=int, default=2, metavar="N",
                   help="other instances tried for a request that fails before its first token (default: 2)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="seconds an instance may take to answer a request (default: 600)")


def router_options(args) -> dict:
    for flag in ("health_interval", "health_timeout", "cooldown", "request_timeout"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.allowed_fails < 1 or args.num_retries < 0:
        raise ValueError("--allowed-fails must be >= 1 and --num-retries >= 0")
    return dict(health_interval=args.health_interval, health_timeout=args.health_timeout,
                allowed_fails=args.allowed_fails, cooldown_s=args.cooldown, num_retries=args.num_retries,
                request_timeout=args.request_timeout)


@command("router", "one OpenAI-compatible endpoint over instance servers that already run (here or on other "
                   "hosts)", _router_args, shared=())
def cmd_router(args) -> int:
    from rsd_runtime.router import Router, serve_router
    from rsd_runtime.routing import get_policy

    router = Router(args.backend, get_policy(args.routing), **router_options(args))
    print(f"rsd-launch router: {len(args.backend)} instance(s), {args.routing}, on http://{args.host}:{args.port}",
          file=sys.stderr)
    serve_router(router, host=args.host, port=args.port)
    return 0


@command("bench", "run a benchmark program (collectives, inference, decode, launch, serve, coe); options after its name go "
                  "to it", _bench_args, shared=())
def cmd_bench(args) -> int:
    import importlib

    return importlib.import_module(BENCHMARKS[args.benchmark]).main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rsd-launch", parents=[*(_shared_parser(g, "top_") for g in SHARED), _verbose_parser("top_")],
        description="Start N emulated neural-engine cards (one OS process each) and run a job on them. "
                    "Options shared by several commands may come before the command or after it; "
                    "`rsd-launch COMMAND --help` lists the ones a command takes.",
    )
    from rsd_runtime import topo_cli  # registers `topo`; imported here, as it imports this module
    COMMANDS.setdefault("topo", topo_cli.COMMAND)  # when this module runs as __main__
    from rsd_runtime import calibrate  # registers `calibrate`, as topo_cli does
    COMMANDS.setdefault("calibrate", calibrate.COMMAND)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _, shared) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text,
                            parents=[*map(_shared_parser, shared), _verbose_parser()],
                            formatter_class=DefaultsFormatter)
        add_arguments(sp)
    return p


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default where there is one to show, options without help text too; not
    None, False, nor a default the help text already states."""

    def _format_action(self, action):
        if action.help is None and _shows(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        if not _shows(action) or "(default" in action.help:
            return action.help
        return super()._get_help_string(action)


def _shows(action) -> bool:
    return action.default not in (None, argparse.SUPPRESS) and action.default is not False


def _shared_parser(group: str, prefix: str = "") -> argparse.ArgumentParser:
    """The parent parser of one group of shared options. Defaults are filled in after parsing
    (``resolve_shared``), so that a value given before the command survives the command's parser."""
    p = argparse.ArgumentParser(add_help=False)
    for flags, kwargs, default in SHARED[group]:
        shown = f"{kwargs['help']} (default: {default})" if default is not False else kwargs["help"]
        p.add_argument(*flags, **{**kwargs, "help": shown},
                       dest=prefix + flags[0].lstrip("-").replace("-", "_"), default=argparse.SUPPRESS)
    return p


def _verbose_parser(prefix: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="count", dest=prefix + "verbose", default=argparse.SUPPRESS,
                   help="log the phases with their times to stderr (-vv: debug)")
    return p


def resolve_shared(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Move options given before the command onto it, refuse the ones it does not take, fill defaults.
    ``args.given`` holds the names of the shared options given on the command line."""
    shared = COMMANDS[args.command][3]
    args.given = set()
    for group, options in SHARED.items():
        for flags, _, default in options:
            name = flags[0].lstrip("-").replace("-", "_")
            before = vars(args).pop("top_" + name, None)
            if before is not None and group not in shared:
                parser.error(f"{flags[0]} means nothing to `{args.command}`; see rsd-launch {args.command} --help")
            if before is not None and not hasattr(args, name):
                setattr(args, name, before)
            if hasattr(args, name):
                args.given.add(name)
            elif group in shared:
                setattr(args, name, default)
    args.verbose = vars(args).pop("top_verbose", 0) + getattr(args, "verbose", 0)
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = resolve_shared(parser, parser.parse_args(argv))
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="rsd-launch: %(relativeCreated)7.0f ms  %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command][2](args)
    except KeyboardInterrupt:
        print("rsd-launch: interrupted; cards shut down", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (rsd-launch topo | head): stop quietly, as the Python docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ClusterError, CardDied, CardError, ValueError, shm.SegmentError, MemoryError, EngineDeadError) as exc:
        print(f"rsd-launch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
