"""Decode speed on the built-in tiny model: tp 1, 2, 4 beside transformers' generate, same run.

    python -m bench.decode [--tp 1 2 4] [--batch 4] [--output-len 64] [--rounds 5] [--json results/decode.json]
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
generation per engine.

Every engine (transformers and each tp, all loaded first) runs once per round,
one after the other, for ``--rounds`` rounds. A ratio is taken within a round
and the table gives medians: a host whose speed drifts (other tenants, clock
changes) between the reference and the cards would otherwise tilt the ratio.
The output ends with the host's load average and why the figures of a model
this small look as they do: fixed per-step work (the cards sharing the host's
cores, per-op launch cost on the emulated clock) sets the pace, not the math.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

from bench.common import write_json
from devices.spec import get_spec
from devices.step import COMPUTE_OPS
from rsd_runtime.cli import DefaultsFormatter
from rsd_runtime.sampling_params import SamplingParams

PROMPTS = ["The weather today is", "Computers can", "When the rain stops, the", "A small program"]


class Ours:
    """One engine of ``tp`` cards on the tiny model, started and warmed up once, run every round."""

    def __init__(self, tp: int, device: str, stack: contextlib.ExitStack):
        from rsd_runtime.llm import LLM

        self.tp = tp
        self.llm = stack.enter_context(LLM(tensor_parallel_size=tp, device=device, progress=False))
        self.llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
        spec = self.llm.engine.cluster.spec
        self.fixed = {"engine": f"rsd-runtime tp={tp}", "tp": tp, "op_overhead_ns": spec.op_overhead_ns,
                      "compute_ops_per_step": sum(op["op"] in COMPUTE_OPS for op in self.llm.engine.programs[0].ops)}

    def run(self, prompts: list[str], output_len: int) -> dict:
        params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params)
        wall = time.perf_counter() - t0
        m = [o.metrics for o in outs]
        decode_s = max(x["latency_s"] for x in m) - min(x["ttft_s"] for x in m)
        n = sum(len(o.token_ids) - 1 for o in outs)
        return {"decode_tok_s": n / decode_s, "wall_s": wall,
                "ttft_s": sum(x["ttft_s"] for x in m) / len(m), "tpot_s": sum(x["tpot_s"] for x in m) / len(m),
                "emu_ttft_s": sum(x["emu_ttft_s"] for x in m) / len(m),
                "emu_tpot_s": sum(x["emu_tpot_s"] for x in m) / len(m),
                "token_ids": [o.token_ids for o in outs]}


def phantom(model: str, tp: int, batch: int, output_len: int, device: str) -> dict:
    """Wall time per decode step of ``batch`` requests on ``tp`` phantom card processes."""
    from rsd_runtime.llm import LLM

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


class Reference:
    """transformers' greedy generate of the same prompts with ``threads`` threads, loaded once."""

    def __init__(self, prompts: list[str], threads: int):
        import torch

        from rsd_runtime.tiny_model import ensure_tiny_model
        try:
            import transformers
        except ImportError:
            raise SystemExit("bench.decode compares with transformers: pip install -e '.[test]'") from None
        self.threads = threads
        path = ensure_tiny_model()
        tok = transformers.AutoTokenizer.from_pretrained(path)
        tok.pad_token, tok.padding_side = tok.eos_token, "left"
        transformers.logging.disable_progress_bar()
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.batch = tok(prompts, return_tensors="pt", padding=True)
        self.kw = dict(do_sample=False, pad_token_id=tok.pad_token_id)
        self.fixed = {"engine": f"transformers generate ({threads} thread{'s' if threads > 1 else ''})", "tp": None}
        self._generate(4)  # warm-up

    def _generate(self, n: int) -> float:
        """Seconds for a greedy generate of exactly ``n`` tokens, on this reference's threads."""
        torch = self.torch
        before = torch.get_num_threads()  # the engines' host sets its own
        torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                self.model.generate(**self.batch, max_new_tokens=n, min_new_tokens=n, **self.kw)
                return time.perf_counter() - t0
        finally:
            torch.set_num_threads(before)

    def run(self, prompts: list[str], output_len: int) -> dict:
        ttft, total = self._generate(1), self._generate(output_len)
        n = len(prompts) * (output_len - 1)
        return {"decode_tok_s": n / max(total - ttft, 1e-9), "wall_s": total, "ttft_s": ttft,
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
    p.add_argument("--rounds", type=int, default=5, help="every engine runs once per round; medians are reported")
    p.add_argument("--device", default="atom-plus")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--phantom", action="store_true", help="phantom cards of --model: wall time of a decode step")
    p.add_argument("--model", default=None, help="with --phantom: a model preset (default llama3-8b)")
    args = p.parse_args(argv)
    get_spec(args.device)  # a bad --device fails now, not after the reference run
    if args.rounds < 1 or args.output_len < 2 or args.batch < 1:
        p.error("--rounds and --batch must be at least 1, --output-len at least 2 (a decode needs a second token)")
    if args.model is not None and not args.phantom:
        p.error("--model needs --phantom (without it the built-in tiny model runs beside transformers)")
    if args.phantom:
        args.model = args.model or "llama3-8b"
        return main_phantom(args)
    import torch

    prompts = (PROMPTS * args.batch)[:args.batch]
    cores = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        engines = [Reference(prompts, 1)] + ([Reference(prompts, cores)] if cores > 1 else [])
        engines += [Ours(tp, args.device, stack) for tp in args.tp]
        load_before = os.getloadavg()[0]
        runs = [[e.run(prompts, args.output_len) for e in engines] for _ in range(args.rounds)]
        load = {"cores": os.cpu_count(), "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]}
    rows = [_median_row(e.fixed, [r[i] for r in runs]) for i, e in enumerate(engines)]
    print(f"# tiny built-in model, batch {args.batch}, {args.output_len} new tokens, greedy; "
          f"emulated cards: {args.device}; medians of {args.rounds} rounds")
    print(f"{'engine':<34} {'decode tok/s':>12} {'TTFT ms':>9} {'TPOT ms':>9}   {'emu TTFT us':>11} "
          f"{'emu TPOT us':>11}")
    print(f"{'':<34} {'---------- wall clock ----------':>32}   {'-- emulated clock --':>23}")
    for r in rows:
        emu = (f"{r['emu_ttft_s'] * 1e6:>11.1f} {r['emu_tpot_s'] * 1e6:>11.2f}" if r["emu_ttft_s"] is not None
               else f"{'-':>11} {'-':>11}")
        print(f"{r['engine']:<34} {r['decode_tok_s']:>12.1f} {r['ttft_s'] * 1e3:>9.2f} {r['tpot_s'] * 1e3:>9.2f}   "
              f"{emu}")
    tokens = {str(run[i]["token_ids"]) for run in runs for i, e in enumerate(engines) if isinstance(e, Ours)}
    emulated = {e.tp: {(run[i]["emu_ttft_s"], run[i]["emu_tpot_s"]) for run in runs}
                for i, e in enumerate(engines) if isinstance(e, Ours)}
    same, repeat = len(tokens) == 1, all(len(v) == 1 for v in emulated.values())
    print(f"# greedy outputs identical across tp and rounds: {same}; emulated figures the same in every round: "
          f"{repeat}")
    per_round = {tp: [run[i]["decode_tok_s"] / run[0]["decode_tok_s"] for run in runs]
                 for i, tp in enumerate(e.fixed["tp"] for e in engines) if tp is not None}
    ratios = {tp: statistics.median(x) for tp, x in per_round.items()}
    print("# decode tok/s over transformers (1 thread), within each round: "
          + "; ".join(f"tp={tp} {ratios[tp]:.2f}x (rounds {', '.join(f'{v:.2f}' for v in x)})"
                      for tp, x in per_round.items()))
    print(why(rows, args.device, load))
    if args.json:
        write_json(args.json, "decode", vars(args), rows, outputs_identical_across_tp=same, host_load=load,
                   ratio_to_transformers_1_thread=ratios, ratios_per_round=per_round)
        print(f"# wrote {args.json}")
    return 0 if same and repeat else 1


def _median_row(fixed: dict, runs: list[dict]) -> dict:
    """One engine's row: the median of each wall figure over the rounds (the emulated ones repeat),
    its per-round tokens/s, and its tokens of the first round."""
    row = dict(fixed)
    for key in ("decode_tok_s", "wall_s", "ttft_s", "tpot_s", "emu_ttft_s", "emu_tpot_s"):
        row[key] = None if runs[0][key] is None else statistics.median(r[key] for r in runs)
    row["decode_tok_s_per_round"] = [r["decode_tok_s"] for r in runs]
    if "token_ids" in runs[0]:
        row["token_ids"] = runs[0]["token_ids"]
    return row


if __name__ == "__main__":
    from bench.common import entry

    entry(main, "python -m bench.decode")
