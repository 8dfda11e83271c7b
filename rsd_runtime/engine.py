"""The engine: a checkpoint split over tp cards, stepped as schedule -> run -> post-process.

    engine = LLMEngine("path/to/model", tp=4)
    engine.add_request("a", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for out in engine.step():          # one delta per request that moved
            print(out.request_id, out.token_ids, out.text, out.finished)

Each step sends one plan to every card: the batch's token ids and block
tables (``devices.step.StepPlan``). The cards run their command streams and
reduce between themselves; one card returns the logits of the rows that
sample; the host samples, applies the stop rules and releases text. The host
keeps an emulated clock too: a step starts when the host sends it and ends
when the slowest card finishes.

A request's state lives in its ``Request`` and goes when it finishes. If a
step fails (a card died, hung or refused the plan), the engine fails every
request in flight with an error output and refuses new work until
``recover()`` has restarted the dead cards and put the cards back in step.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

import numpy as np
import torch

from devices.step import SeqSlice, StepPlan
from rsd_runtime.block_manager import BlockManager
from rsd_runtime.card_runner import CardRunner, StepFailed
from rsd_runtime.checkpoint import load_checkpoint
from rsd_runtime.cluster import Cluster, start_with_bar
from rsd_runtime.compiler import check_tp
from rsd_runtime.deploy import deploy, load_programs
from rsd_runtime.errors import EngineDeadError  # noqa: F401 (part of the engine's API)
from rsd_runtime.outputs import RequestOutput, TokenLogprob
from rsd_runtime.phases import phase
from rsd_runtime.request import Request
from rsd_runtime.sampling import Sampler, SamplingParams, make_generator, token_logprobs
from rsd_runtime.scheduler import MAX_NUM_SEQS, Batch, Scheduler, ScheduledSeq
from rsd_runtime.sequence import Sequence
from rsd_runtime.stopping import TextStop, token_stop
from rsd_runtime.tokenizer import IncrementalDecoder, Tokenizer, tokenizer_file

log = logging.getLogger("rsd.engine")


def host_threads(num_cards: int) -> None:
    """Leave a core to every card process: the host's torch ops (sampling) get the cores that remain,
    at least one. A second intra-op thread that spins while the cards want the core costs the host
    milliseconds per step on a machine with fewer cores than processes."""
    torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - num_cards)))


class LLMEngine:
    def __init__(self, model: str, tp: int = 1, *, device: str = "atom-plus", dtype: str | None = None,
                 block_size: int = 16, num_kv_blocks: int | None = None, max_num_seqs: int = MAX_NUM_SEQS,
                 max_num_batched_tokens: int = 512, chunk_size: int = 256, max_model_len: int | None = None,
                 kv_utilization: float | None = None, progress: bool = True, phantom: bool = False,
                 check_weights: bool | None = None, cluster: Cluster | None = None, cards: list[int] | None = None,
                 backend: str = "cards", topology=None, fusion: str = "none", overlap="off", host_overhead="off",
                 expert: str | None = None, staging: str | None = None,
                 **cluster_kwargs):
        """``backend="sim"`` (phantom only) runs the instance in this process on the emulated clock
        (``rsd_runtime.sim_runner``): no card processes, the same emulated figures. ``topology``: a
        preset name (with ``link`` and ``topology_options``) or, for the sim backend, a Topology.
        ``fusion`` (none, ops, layer) and ``overlap`` (off, on) are compiler choices
        (``devices.fusion``, ``rsd_runtime.pipelining``); they change the schedule, not the values.
        ``host_overhead`` (off, on, or a host preset: ``rsd_runtime.host_spec``) charges the host's work.
        ``expert``: this model is one of a pool sharing the cards (``rsd_runtime.coe_engine``); its
        shards wait in the ``staging`` tier until ``load_program()`` after the pool activated it."""
        # bad checkpoints and impossible splits fail before any card starts
        self.timings: dict[str, float] = {}  # wall seconds of the phases: read_s, start_s, load_s, shutdown_s
        with phase(log, f"read model {model}", self.timings, "read_s"):
            self.ckpt, cfg, tokenizer_path = resolve_model(model, phantom, progress, check_weights)
        self.model = model
        self.cfg = cfg
        check_tp(cfg, tp)
        self.tp = tp
        self.phantom = phantom
        self.dtype = dtype or cfg.dtype
        self._max_num_seqs, self._max_batched, self._chunk = max_num_seqs, max_num_batched_tokens, chunk_size
        self.weight_dtype = self.ckpt.dtype("model.embed_tokens.weight") if self.ckpt else cfg.dtype
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.block_size = block_size
        if cluster is not None:
            device, phantom = cluster.spec, cluster.phantom
            self.phantom = phantom
        self.num_kv_blocks = num_kv_blocks or self._default_kv_blocks(device, max_num_seqs, kv_utilization)
        self.tokenizer = Tokenizer.from_file(tokenizer_path) if tokenizer_path else None
        self.eos_ids = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_id is not None:
            self.eos_ids.add(self.tokenizer.eos_id)
        self.cards = list(range(tp)) if cards is None else list(cards)
        from rsd_runtime.pipelining import parse_overlap

        from rsd_runtime.host_spec import get_host

        self.fusion, self.overlap, self.host = fusion, parse_overlap(overlap), get_host(host_overhead)
        self.pipeliner = None
        self.expert = expert
        self.weight_prefix = f"{expert}/" if expert is not None else ""
        if backend == "sim":
            self._start_sim(device, topology, cluster_kwargs)
            return
        if backend != "cards":
            raise ValueError(f"unknown backend {backend!r}; known: cards, sim")
        if topology is not None:
            cluster_kwargs["topology"] = topology
        self.owns_cluster = cluster is None
        with phase(log, f"start {tp} cards", self.timings, "start_s"):
            self.cluster = cluster or start_with_bar(
                Cluster(num_devices=tp, device=device, phantom=phantom, **cluster_kwargs), progress)
        try:
            with phase(log, "load the model onto the cards", self.timings, "load_s"):
                self.programs = deploy(self.cluster, cfg, tp, self.cards, ckpt=self.ckpt, dtype=self.dtype,
                                       weight_dtype=self.weight_dtype, num_kv_blocks=self.num_kv_blocks,
                                       block_size=block_size, progress=progress, fusion=fusion, expert=expert,
                                       tier=staging)
            if self.overlap:
                self.pipeliner = self._pipeliner(self.cluster.spec, self.cluster.topology)
        except BaseException:
            self.close()
            raise
        self.runner = CardRunner(self.cluster, self.cards, vocab_size=cfg.vocab_size)
        host_threads(self.cluster.num_devices)
        self._init_host()

    def load_program(self) -> None:
        """Install this model's command stream on its cards again (an expert made active); the KV cache
        stays if its layout is the same."""
        if self.cluster is not None:
            load_programs(self.cluster, self.programs, self.cfg, dtype=self.dtype, weight_dtype=self.weight_dtype,
                          num_kv_blocks=self.num_kv_blocks, block_size=self.block_size, attach=True,
                          weight_prefix=self.weight_prefix)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def kv_usage(self) -> float:
        """Share of KV blocks in use (1 means all)."""
        return 1.0 - self.blocks.num_free_blocks / self.blocks.num_blocks

    def _start_sim(self, device, topology, cluster_kwargs) -> None:
        from devices.spec import DeviceSpec, get_spec
        from interconnect.topology import topology_for
        from rsd_runtime.compiler import compile_model
        from rsd_runtime.deploy import check_fits
        from rsd_runtime.sim_runner import SimRunner

        if not self.phantom:
            raise ValueError("the sim backend runs phantom instances only (phantom=True)")
        spec = device if isinstance(device, DeviceSpec) else get_spec(device)
        if topology is None or isinstance(topology, str):
            topology = topology_for(topology or "switch", max(self.cards) + 1, cluster_kwargs.get("link"),
                                    **cluster_kwargs.get("topology_options", {}))
        self.owns_cluster, self.cluster, self.spec = False, None, spec
        self.programs = compile_model(self.cfg, self.tp, self.cards, fusion=self.fusion)
        check_fits(self.cfg, self.tp, spec, self.weight_dtype, self.dtype, self.num_kv_blocks, self.block_size,
                   self.cards[0])
        self.runner = SimRunner(self.programs, self.cfg, spec, topology, dtype=self.dtype,
                                weight_dtype=self.weight_dtype)
        if self.overlap:
            self.pipeliner = self._pipeliner(spec, topology)
        self._init_host()

    def _pipeliner(self, spec, topology):
        """The instance simulated in this process, to price each step's chunking (``--overlap on``)."""
        from rsd_runtime.pipelining import Pipeliner

        return Pipeliner(self.simulator(spec, topology), self.overlap)  # spec None: this instance's

    def set_options(self, *, fusion: str | None = None, overlap=None, host_overhead=None) -> None:
        """Change the compiler's choices and the host's costs between steps, weights and KV cache kept:
        the command streams are compiled again and reinstalled on the cards (an expert's when it is made
        active)."""
        from rsd_runtime.compiler import compile_model
        from rsd_runtime.host_spec import get_host
        from rsd_runtime.pipelining import parse_overlap

        if overlap is not None:
            self.overlap = parse_overlap(overlap)
        if host_overhead is not None:
            self.host = get_host(host_overhead)
        if fusion is not None and fusion != self.fusion:
            self.programs = compile_model(self.cfg, self.tp, self.cards, fusion=fusion)
            self.fusion = fusion
            if self.cluster is not None:
                if self.expert is None:  # an expert of a pool gets its new stream when made active (load_program)
                    self.load_program()
            else:
                clocks, ports = self.runner.clocks, self.runner.ports
                self.runner = self.simulator()
                self.runner.clocks, self.runner.ports = clocks, ports
        self.pipeliner = self._pipeliner(None, None) if self.overlap else None

    def simulator(self, spec=None, topology=None):
        """A fresh ``SimRunner`` of this instance: its steps cost what the cards charge."""
        from rsd_runtime.sim_runner import SimRunner

        if spec is None:
            spec = self.cluster.spec if self.cluster is not None else self.spec
            topology = self.cluster.topology if self.cluster is not None else self.runner.topology
        return SimRunner(self.programs, self.cfg, spec, topology, dtype=self.dtype, weight_dtype=self.weight_dtype)

    def _init_host(self) -> None:
        """The host side of the engine: KV blocks, scheduler, sampler, the requests it holds."""
        self.blocks = BlockManager(self.num_kv_blocks, self.block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=self._max_num_seqs,
                                   max_num_batched_tokens=self._max_batched, chunk_size=self._chunk)
        self.sampler = Sampler()
        self.requests: dict[str | int, Request] = {}  # live requests only
        self._by_seq: dict[int, Request] = {}
        self._seq_ids = 0
        self.emu_now = 0  # host's emulated clock, ns
        self._prev_start = None  # emulated start of the last step while busy (async host scheduling)
        self.last_device_ns = 0  # the cards' share of the last step
        self.dead: Exception | None = None
        self.stats = EngineStats()
        self.on_step = None  # optional hook(emulated ns of the step, batch): benchmarks record steps with it
        self.trace = None  # a rsd_runtime.trace.Trace being drawn (start_trace)
        self._trace_pid = 0
        self._trace_runner = None

    def _default_kv_blocks(self, device, max_num_seqs: int, kv_utilization: float | None) -> int:
        if kv_utilization is None:
            return -(-max_num_seqs * min(self.max_model_len, 1024) // self.block_size)
        # as much as fits beside the weights in this share of the card (vLLM's gpu_memory_utilization)
        from devices.memory import OutOfDeviceMemory, fmt_bytes
        from devices.spec import DeviceSpec, get_spec
        from rsd_runtime.deploy import max_kv_blocks

        spec = device if isinstance(device, DeviceSpec) else get_spec(device)
        blocks = max_kv_blocks(self.cfg, self.tp, spec, self.weight_dtype, self.dtype, self.block_size,
                               kv_utilization)
        if blocks < 1:
            raise OutOfDeviceMemory(f"card 0: the weights of this model at tp={self.tp} leave no room for a KV "
                                    f"cache in {kv_utilization:.0%} of {fmt_bytes(spec.memory_bytes)}; "
                                    f"use a larger tp")
        return blocks

    @property
    def max_len(self) -> int:
        """The most tokens a request may hold, prompt and output: the context, or the whole KV cache."""
        return min(self.max_model_len, self.scheduler.max_len)

    # -- requests ----------------------------------------------------------------------
    def validate(self, prompt, params: SamplingParams | None) -> list[int]:
        """The prompt's token ids, or ValueError naming what is wrong; changes nothing."""
        if params is not None and not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer.json: give the prompt as token ids")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            ids = list(prompt)
        else:
            raise TypeError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is "
                             f"{self.max_model_len} tokens, and at least one must be left to generate")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.cfg.vocab_size})")
        if len(ids) > self.scheduler.max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the whole KV cache holds "
                             f"{self.scheduler.max_len}")
        if params is not None and params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        return ids

    def add_request(self, request_id, prompt, params: SamplingParams | None = None, *,
                    arrival_time: float | None = None, emu_arrival: int | None = None) -> Request:
        """Queue a request (prompt: text or token ids). Raises, leaving nothing queued, if it is invalid.

        ``arrival_time`` (wall, time.perf_counter) and ``emu_arrival`` (emulated ns) default to now; an
        idle engine's clock moves up to ``emu_arrival`` (the replay jumps idle instances to their next
        arrival)."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine is down ({self.dead}); call recover() first")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        ids = self.validate(prompt, params)
        seq = Sequence(seq_id=self._seq_ids, prompt_ids=ids, params=params)
        self._seq_ids += 1
        if not self.requests:  # idle: the host prepares nothing ahead of an arrival
            self._prev_start = None
        if emu_arrival is not None and not self.requests:
            self.emu_now = max(self.emu_now, emu_arrival)
        req = Request(request_id, prompt if isinstance(prompt, str) else None, seq,
                      make_generator(params.seed) if params.temperature > 0 else None,
                      IncrementalDecoder(self.tokenizer) if self.tokenizer is not None else None,
                      TextStop(params), emu_arrival=self.emu_now if emu_arrival is None else emu_arrival)
        if arrival_time is not None:
            req.arrival = arrival_time
        self.scheduler.add(seq)
        self.requests[request_id] = req
        self._by_seq[seq.seq_id] = req
        return req

    def abort_request(self, request_id) -> bool:
        """Drop a request now and free its KV blocks; False if it is not (or no longer) live."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.finish(req.seq, "abort")
        self._forget(req)
        self.stats.aborted += 1
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def _forget(self, req: Request) -> None:
        del self.requests[req.request_id]
        del self._by_seq[req.seq.seq_id]

    # -- one step: schedule -> run -> post-process --------------------------------------
    def step(self, on_sent=None) -> list[RequestOutput]:
        """Run one step; a delta for every request that produced a token, text, or finished.
        ``on_sent()``: called while the cards run the step (a server hands out the previous step's
        outputs then, so that its HTTP work overlaps the cards instead of delaying the plan)."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine is down ({self.dead}); call recover() first")
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        new = 0
        for s in batch.seqs:
            req = self._by_seq[s.seq.seq_id]
            if req.scheduled is None:
                req.scheduled, req.emu_scheduled = time.perf_counter(), self.emu_now
                new += 1
        start = self.emu_now
        plan = self.plan(batch)
        if self.host is not None:
            t0 = self.host.start(self.emu_now, self.host.prepare_ns(len(batch.seqs), new), self._prev_start)
            plan = replace(plan, t_start=t0)
            self._prev_start = t0
        try:
            logits, end = self.runner.run(plan, on_sent)
        except StepFailed as exc:
            self.dead = exc.cause
            self.stats.failed_steps += 1
            raise EngineDeadError(f"a step failed: {exc}") from exc.cause
        self.last_device_ns = end - plan.t_start
        self.emu_now = out_time = end
        if self.host is not None:
            self.emu_now, out_time = self.host.finish(end, sum(1 for s in batch.seqs if s.sample))
        if self.trace is not None:
            self.draw(plan, end, out_time, sum(1 for s in batch.seqs if s.sample), new)
        if self.on_step is not None:
            self.on_step(self.emu_now - start, batch)
        return self._postprocess(batch, logits, out_time)

    def start_trace(self, trace, *, host_pid: int = 0, card_offset: int = 0) -> None:
        """Draw every later step into ``trace`` (``rsd_runtime.trace``): the instance simulated in this
        process gives the spans (card processes charge the same times). Instances of a rack that number
        their cards alike draw with their own ``host_pid`` (-i) and ``card_offset``."""
        from rsd_runtime.sim_runner import SimRunner
        from rsd_runtime.trace import SimTracer

        runner = self.runner
        if not isinstance(runner, SimRunner):
            runner = self._trace_runner = self.simulator()
        runner.tracer = SimTracer(trace, [c + card_offset for c in self.cards])
        self.trace, self._trace_pid = trace, host_pid

    def draw(self, plan: StepPlan, end: int, out_time: int, sampled: int, new: int) -> None:
        """Draw a step that ran into the trace: the cards' spans, the step, the host's work."""
        if self._trace_runner is not None:
            self._trace_runner.run(plan)
        kind = "decode" if all(s.num_tokens == 1 for s in plan.seqs) else "prefill"
        pid = self._trace_pid
        self.trace.step(kind, plan.t_start, end, host_pid=pid, tokens=plan.num_tokens, seqs=len(plan.seqs),
                        chunks=plan.chunks)
        host = self.host
        if host is not None:
            prep = host.prepare_ns(len(plan.seqs), new)
            self.trace.host("prepare", plan.t_start - prep, plan.t_start, host_pid=pid)
            self.trace.host("sample", end, end + host.sample_ns * sampled, host_pid=pid)
            self.trace.host("detokenise", end + host.sample_ns * sampled, out_time, api=True, host_pid=pid)

    def plan(self, batch: Batch, all_logits: bool = False) -> StepPlan:
        """The step plan of a batch: one row per token fed; logits for the rows that sample (or all)."""
        seqs, rows, tokens, row = [], [], [], 0
        for s in batch.seqs:
            seqs.append(SeqSlice(row, s.num_tokens, s.start, [] if self.phantom else s.seq.block_table))
            if not self.phantom:
                tokens += s.token_ids
            if all_logits:
                rows += range(row, row + s.num_tokens)
            elif s.sample:
                rows.append(row + s.num_tokens - 1)
            row += s.num_tokens
        plan = StepPlan(self.emu_now, seqs, rows, None if self.phantom else np.asarray(tokens, np.int32))
        return plan if self.pipeliner is None else self.pipeliner.apply(plan)

    def _postprocess(self, batch: Batch, logits, out_time: int) -> list[RequestOutput]:
        """Sample, release text, apply the stop rules; tokens reach their requests at ``out_time`` (emulated)."""
        sampling = [s for s in batch.seqs if s.sample]
        reqs = [self._by_seq[s.seq.seq_id] for s in sampling]
        want = [r.params.logprobs for r in reqs]
        lps = [None] * len(reqs)
        if logits is None:  # phantom cards compute nothing: every token is 0
            tokens = [0] * len(reqs)
        else:
            tokens = self.sampler.sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
        if logits is not None and any(k is not None for k in want):
            idx = [i for i, k in enumerate(want) if k is not None]
            for i, (lp, top) in zip(idx, token_logprobs(logits[idx], [tokens[i] for i in idx], [want[i] for i in idx])):
                lps[i] = TokenLogprob(tokens[i], lp, top)
        self.scheduler.postprocess(batch, {r.seq.seq_id: t for r, t in zip(reqs, tokens)})
        now = time.perf_counter()
        max_len = self.max_len
        outs = []
        for req, token, lp in zip(reqs, tokens, lps):
            req.add_token(token, lp, now, out_time)
            reason = token_stop(req.seq, token, self.eos_ids, max_len)
            if reason is None and req.text_stop.hit:
                reason = "stop"
            if reason is not None:
                self.scheduler.finish(req.seq, reason)
                self._forget(req)
                self.stats.finished += 1
            outs.append(req.output(now, out_time))
        self.stats.steps += 1
        self.stats.prompt_tokens += sum(s.num_tokens for s in batch.seqs if s.start < s.seq.num_prompt_tokens)
        self.stats.generation_tokens += len(tokens)
        return outs

    def prefill_logits(self, prompt_ids: list[int]) -> "torch.Tensor":  # noqa: F821
        """Logits at every position of one prompt (T, vocab), as a model's forward pass gives them."""
        seq = Sequence(seq_id=-1, prompt_ids=self.validate(prompt_ids, None), params=SamplingParams())
        if not self.blocks.can_allocate(seq, seq.num_tokens):
            raise MemoryError("not enough free KV blocks for this prompt")
        self.blocks.allocate(seq, seq.num_tokens)
        try:
            logits, self.emu_now = self.runner.run(self.plan(Batch([ScheduledSeq(seq, 0, seq.num_tokens, True)]),
                                                             all_logits=True))
            return logits
        finally:
            self.blocks.free(seq)

    # -- failures ----------------------------------------------------------------------------
    def fail_all(self, error: str) -> list[RequestOutput]:
        """End every live request with finish reason "error"; their final outputs."""
        now, outs = time.perf_counter(), []
        for req in list(self.requests.values()):
            self.scheduler.finish(req.seq, "error")
            self._forget(req)
            out = req.output(now, self.emu_now)
            out.error = error
            outs.append(out)
        self.stats.errored += len(outs)
        return outs

    def recover(self) -> list[RequestOutput]:
        """Restart dead cards, put every card back in step, and take work again.

        A restarted card re-attaches to its weights and KV cache (they live in shared memory)
        and gets its command stream again. Requests in flight when the step failed end with
        an error; their outputs are returned.
        """
        cause = str(self.dead) if self.dead is not None else "recovery"
        failed = self.fail_all(f"the cards failed: {cause.splitlines()[0]}")
        restarted = [c for c in self.cards if c in self.cluster.control.dead]
        for card in restarted:
            self.cluster.restart(card)
        if restarted:
            load_programs(self.cluster, self.programs, self.cfg, dtype=self.dtype, weight_dtype=self.weight_dtype,
                          num_kv_blocks=self.num_kv_blocks, block_size=self.block_size,
                          cards=restarted, attach=True, weight_prefix=self.weight_prefix)
        self.runner.resync()
        self.dead = None
        self.stats.recoveries += 1
        self.stats.cards_restarted += len(restarted)
        return failed

    def close(self) -> None:
        if self.owns_cluster and self.cluster is not None:
            with phase(log, f"shut down {self.cluster.num_devices} cards", self.timings, "shutdown_s"):
                self.cluster.shutdown()
            self.owns_cluster = False  # closed once


class EngineStats:
    """Counters a server exports (``/metrics``)."""

    def __init__(self):
        self.steps = self.finished = self.aborted = self.errored = 0
        self.prompt_tokens = self.generation_tokens = 0
        self.failed_steps = self.recoveries = self.cards_restarted = 0


def resolve_model(model: str, phantom: bool, progress: bool = True, check_weights: bool | None = None):
    """(checkpoint or None, ModelConfig, tokenizer.json path or None); ``check_weights``: see load_checkpoint.

    A phantom run needs only the shape of a model: a preset name (llama3-8b, ...) or a
    directory's config.json; its weights, if any, are not read.
    """
    import json
    from pathlib import Path

    from rsd_runtime.model_config import MODEL_PRESETS, ModelConfig

    if phantom:
        if model in MODEL_PRESETS:
            return None, MODEL_PRESETS[model], None
        path = Path(model)
        if not (path / "config.json").is_file():
            raise ValueError(f"{model!r} is neither a model preset ({', '.join(MODEL_PRESETS)}) "
                             f"nor a directory with a config.json")
        return None, ModelConfig.from_hf(json.loads((path / "config.json").read_text())), tokenizer_file(path)
    if model in MODEL_PRESETS:
        raise ValueError(f"{model!r} is a shape preset without weights: run it with phantom cards (--phantom)")
    ckpt = load_checkpoint(model, progress=progress, check_weights=check_weights)
    return ckpt, ckpt.config, ckpt.tokenizer_path
