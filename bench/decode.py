"""Decode speed on the built-in tiny model: tp 1, 2, 4 beside transformers' generate, same run.

    python -m bench.decode [--tp 1 2 4] [--batch 4] [--output-len 64] [--json results/decode.json]
    python -m bench.decode --phantom --model llama3-8b --tp 4 8 --batch 8

``--phantom``: phantom card processes of a model preset; the wall time of a
decode step (``tpot_s``, records keyed by ``tp``) is then all messaging and
bookkeeping, since phantom cards do no math. The machine's load average is
printed beside every figure: the cards share this machine's cores with
whatever else runs.

Wall clock: decode tokens/s = tokens after each request's first / (time from
the first token to the last), summed over the batch; transformers' figure is
measured the same way with a streamer-free timing of its greedy generate of
the same prompts (batch, left padding). Emulated clock: TTFT and TPOT of the
same run on the emulated cards. Greedy sampling, fixed prompts, one warm-up
generation per engine. The output ends with the host's load average and why
the figures of a model this small look as they do: fixed per-step work (the
cards sharing the host's cores, per-op launch cost on the emulated clock)
sets the pace, not the math.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from bench.common import write_json
from devices.spec import get_spec
from devices.step import COMPUTE_OPS
from rsd_runtime.cli import DefaultsFormatter
from rsd_runtime.llm import LLM
from rsd_runtime.sampling import SamplingParams
from rsd_runtime.tiny_model import ensure_tiny_model

PROMPTS = ["The weather today is", "Computers can", "When the rain stops, the", "A small program"]


def ours(tp: int, prompts: list[str], output_len: int, device: str) -> dict:
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    with LLM(tensor_parallel_size=tp, device=device, progress=False) as llm:
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t0
        spec = llm.engine.cluster.spec
        compute_ops = sum(op["op"] in COMPUTE_OPS for op in llm.engine.programs[0].ops)
    m = [o.metrics for o in outs]
    decode_s = max(x["latency_s"] for x in m) - min(x["ttft_s"] for x in m)
    n = sum(len(o.token_ids) - 1 for o in outs)
    return {"engine": f"rsd-runtime tp={tp}", "tp": tp, "decode_tok_s": n / decode_s, "wall_s": wall,
            "compute_ops_per_step": compute_ops, "op_overhead_ns": spec.op_overhead_ns,
            "ttft_s": sum(x["ttft_s"] for x in m) / len(m), "tpot_s": sum(x["tpot_s"] for x in m) / len(m),
            "emu_ttft_s": sum(x["emu_ttft_s"] for x in m) / len(m),
            "emu_tpot_s": sum(x["emu_tpot_s"] for x in m) / len(m),
            "token_ids": [o.token_ids for o in outs]}


def phantom(model: str, tp: int, batch: int, output_len: int, device: str) -> dict:
    """Wall time per decode step of ``batch`` requests on ``tp`` phantom card processes."""
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    prompts = [[1 + (7 * i + k) % 1000 for k in range(16)] for i in range(batch)]  # fixed token ids
    with LLM(model, tensor_parallel_size=tp, device=device, phantom=True, progress=False) as llm:
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
        load = os.getloadavg()[0]
        outs = llm.generate(prompts, params)
    m = [o.metrics for o in outs]
    return {"engine": f"rsd-runtime phantom tp={tp}", "tp": tp, "tpot_s": sum(x["tpot_s"] for x in m) / len(m),
            "ttft_s": sum(x["ttft_s"] for x in m) / len(m), "emu_tpot_s": sum(x["emu_tpot_s"] for x in m) / len(m),
            "loadavg_1m": load, "loadavg_1m_after": os.getloadavg()[0]}


def main_phantom(args) -> int:
    rows = [phantom(args.model, tp, args.batch, args.output_len, args.device) for tp in args.tp]
    print(f"# {args.model} on phantom {args.device} cards, batch {args.batch}, {args.output_len} new tokens; "
          f"{os.cpu_count()} cores")
    print(f"{'engine':<28} {'TPOT ms':>9} {'TTFT ms':>9}   {'emu TPOT us':>11}   {'loadavg 1m':>10}")
    print(f"{'':<28} {'---- wall clock ----':>19}   {'emulated':>11}")
    for r in rows:
        print(f"{r['engine']:<28} {r['tpot_s'] * 1e3:>9.2f} {r['ttft_s'] * 1e3:>9.2f}   "
              f"{r['emu_tpot_s'] * 1e6:>11.2f}   {r['loadavg_1m']:>5.2f}-{r['loadavg_1m_after']:.2f}")
    if args.json:
        write_json(args.json, "decode_phantom", vars(args), rows)
        print(f"# wrote {args.json}")
    return 0


def reference(prompts: list[str], output_len: int, threads: int) -> dict:
    try:
        import transformers
    except ImportError:
        raise SystemExit("bench.decode compares with transformers: pip install -e '.[test]'") from None
    torch.set_num_threads(threads)
    path = ensure_tiny_model()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    transformers.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(**batch, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(**batch, max_new_tokens=output_len, min_new_tokens=output_len, **kw)
        total = time.perf_counter() - t0
    n = len(prompts) * (output_len - 1)
    return {"engine": f"transformers generate ({threads} thread{'s' if threads > 1 else ''})", "tp": None,
            "decode_tok_s": n / max(total - ttft, 1e-9), "wall_s": total, "ttft_s": ttft,
            "tpot_s": (total - ttft) / (output_len - 1), "emu_ttft_s": None, "emu_tpot_s": None}


def why(rows: list[dict], device: str, load: dict) -> str:
    """What the figures of a model this small measure: fixed per-step work, not math."""
    ours = [r for r in rows if r["tp"] is not None]
    first = ours[0]
    overhead_us = first["compute_ops_per_step"] * first["op_overhead_ns"] / 1e3
    busy = max(load["loadavg_1min_before"], load["loadavg_1min_after"]) > load["cores"]
    h100 = get_spec("gpu-h100").op_overhead_ns / 1e3
    return "\n".join([
        f"# host: {load['cores']} cores, 1-minute load average {load['loadavg_1min_before']:.1f} before the run and "
        f"{load['loadavg_1min_after']:.1f} after{' (other work shares the cores)' if busy else ''}",
        "# wall clock: the host and the tp card processes share these cores, and every decode step sends each card",
        "#   its step and runs an all_reduce per layer among them; on a model this small the math is next to",
        "#   nothing, so that fixed per-step work sets the pace, and it grows with tp: wall tokens/s falls as tp",
        "#   rises here, where on real cards with a real model tp divides the weight bytes each card reads.",
        f"# emulated clock: {first['compute_ops_per_step']} compute ops per step at tp={first['tp']}, each with "
        f"{device}'s fixed launch cost of {first['op_overhead_ns'] / 1e3:g} us,",
        f"#   make {overhead_us:.0f} us of the {first['emu_tpot_s'] * 1e6:.0f} us TPOT: a card with a larger per-op "
        f"cost (gpu-h100: {h100:g} us) is slower",
        "#   on this model however fast its math; bench.inference on a model of real size shows the weight bytes,",
        "#   not the launches, setting the pace.",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batch", type=int, default=4, help="prompts generated together")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--device", default="atom-plus")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--phantom", action="store_true", help="phantom cards of --model: wall time of a decode step")
    p.add_argument("--model", default=None, help="with --phantom: a model preset (default llama3-8b)")
    args = p.parse_args(argv)
    get_spec(args.device)  # a bad --device fails now, not after the reference run
    if args.model is not None and not args.phantom:
        p.error("--model needs --phantom (without it the built-in tiny model runs beside transformers)")
    if args.phantom:
        args.model = args.model or "llama3-8b"
        return main_phantom(args)
    prompts = (PROMPTS * args.batch)[:args.batch]
    load_before = os.getloadavg()[0]
    cores = torch.get_num_threads()
    rows = [reference(prompts, args.output_len, 1)] + ([reference(prompts, args.output_len, cores)] if cores > 1 else [])
    rows += [ours(tp, prompts, args.output_len, args.device) for tp in args.tp]
    print(f"# tiny built-in model, batch {args.batch}, {args.output_len} new tokens, greedy; "
          f"emulated cards: {args.device}")
    print(f"{'engine':<34} {'decode tok/s':>12} {'TTFT ms':>9} {'TPOT ms':>9}   {'emu TTFT us':>11} "
          f"{'emu TPOT us':>11}")
    print(f"{'':<34} {'---------- wall clock ----------':>32}   {'-- emulated clock --':>23}")
    for r in rows:
        emu = (f"{r['emu_ttft_s'] * 1e6:>11.1f} {r['emu_tpot_s'] * 1e6:>11.2f}" if r["emu_ttft_s"] is not None
               else f"{'-':>11} {'-':>11}")
        print(f"{r['engine']:<34} {r['decode_tok_s']:>12.1f} {r['ttft_s'] * 1e3:>9.2f} {r['tpot_s'] * 1e3:>9.2f}   "
              f"{emu}")
    same = len({str(r["token_ids"]) for r in rows if "token_ids" in r}) == 1
    print(f"# greedy outputs identical across tp: {same}")
    load = {"cores": os.cpu_count(), "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]}
    ref = rows[0]["decode_tok_s"]
    ratios = {r["tp"]: r["decode_tok_s"] / ref for r in rows if r["tp"] is not None}
    print("# decode tok/s over transformers (1 thread), same run: "
          + ", ".join(f"tp={tp} {x:.2f}x" for tp, x in ratios.items()))
    print(why(rows, args.device, load))
    if args.json:
        write_json(args.json, "decode", vars(args), rows, outputs_identical_across_tp=same, host_load=load,
                   ratio_to_transformers_1_thread=ratios)
        print(f"# wrote {args.json}")
    return 0 if same else 1


if __name__ == "__main__":
    from bench.common import entry

    entry(main, "python -m bench.decode")
