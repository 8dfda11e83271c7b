"""The engine: a checkpoint split over tp cards, stepped as schedule -> run -> post-process.

    engine = LLMEngine("path/to/model", tp=4)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for seq, token in engine.step(): ...

Each step sends the same small message to every card: the batch's token ids,
positions and block tables. The cards run their command streams and reduce
between themselves; card 0 returns the logits of the rows that sample; the
host samples. The host keeps an emulated clock too: a step starts when the
host sends it and ends when the slowest card finishes.
"""
from __future__ import annotations

import logging
import time

import torch

from rsd_runtime.block_manager import BlockManager
from rsd_runtime.checkpoint import load_checkpoint
from rsd_runtime.cluster import Cluster
from rsd_runtime.compiler import check_tp
from rsd_runtime.deploy import deploy
from rsd_runtime.sampling import Sampler, SamplingParams, make_generator
from rsd_runtime.scheduler import Batch, Scheduler
from rsd_runtime.sequence import Sequence
from rsd_runtime.tokenizer import Tokenizer

log = logging.getLogger("rsd.engine")


class LLMEngine:
    def __init__(self, model: str, tp: int = 1, *, device: str = "atom-plus", dtype: str | None = None,
                 block_size: int = 16, num_kv_blocks: int | None = None, max_num_seqs: int = 16,
                 max_num_batched_tokens: int = 512, chunk_size: int = 256, max_model_len: int | None = None,
                 progress: bool = True, phantom: bool = False, **cluster_kwargs):
        # bad checkpoints and impossible splits fail before any card starts
        self.ckpt, cfg, tokenizer_path = resolve_model(model, phantom, progress)
        self.cfg = cfg
        check_tp(cfg, tp)
        self.tp = tp
        self.phantom = phantom
        self.dtype = dtype or cfg.dtype
        weight_dtype = self.ckpt.dtype("model.embed_tokens.weight") if self.ckpt else cfg.dtype
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks or -(-max_num_seqs * min(self.max_model_len, 1024) // block_size)
        self.tokenizer = Tokenizer.from_file(tokenizer_path) if tokenizer_path else None
        self.eos_ids = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_id is not None:
            self.eos_ids.add(self.tokenizer.eos_id)
        self.cluster = Cluster(num_devices=tp, device=device, phantom=phantom, **cluster_kwargs).start()
        try:
            deploy(self.cluster, cfg, tp, list(range(tp)), ckpt=self.ckpt, dtype=self.dtype,
                   weight_dtype=weight_dtype, num_kv_blocks=self.num_kv_blocks, block_size=block_size,
                   progress=progress)
        except BaseException:
            self.cluster.shutdown()
            raise
        self.blocks = BlockManager(self.num_kv_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens, chunk_size=chunk_size)
        self.sampler = Sampler()
        self.generators: dict[int, torch.Generator | None] = {}
        self.next_id = 0
        self.emu_now = 0  # host's emulated clock, ns
        self.step_times: list[int] = []  # emulated duration of every step, ns
        self.metrics: dict[int, dict] = {}

    # -- requests ----------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Sequence:
        params = params or SamplingParams()
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                             f"{self.max_model_len} tokens, and at least one must be left to generate")
        bad = [t for t in prompt_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.cfg.vocab_size})")
        seq = Sequence(seq_id=self.next_id, prompt_ids=list(prompt_ids), params=params)
        self.next_id += 1
        self.generators[seq.seq_id] = make_generator(params.seed) if params.temperature > 0 else None
        self.metrics[seq.seq_id] = {"arrival": time.perf_counter(), "emu_arrival": self.emu_now, "token_times": [],
                                    "emu_token_times": []}
        self.scheduler.add(seq)
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step: schedule -> run -> post-process --------------------------------------
    def step(self) -> list[tuple[Sequence, int]]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        logits = self.run(batch)
        sampling = [s for s in batch.seqs if s.sample]
        tokens = self.sampler.sample(logits, [s.seq.params for s in sampling],
                                     [self.generators[s.seq.seq_id] for s in sampling]) if sampling else []
        sampled = {s.seq.seq_id: t for s, t in zip(sampling, tokens)}
        now = time.perf_counter()
        for s in sampling:
            m = self.metrics[s.seq.seq_id]
            m["token_times"].append(now)
            m["emu_token_times"].append(self.emu_now)
        self.scheduler.postprocess(batch, sampled, self.eos_ids, self.max_model_len)
        return [(s.seq, sampled[s.seq.seq_id]) for s in sampling]

    def run(self, batch: Batch, all_logits: bool = False) -> torch.Tensor:
        """Run one step on the cards; the logits (rows, vocab) of the rows that sample (or all rows)."""
        tokens, positions, seqs, rows = [], [], [], []
        for s in batch.seqs:
            row = len(tokens)
            tokens += s.seq.all_ids[s.start:s.start + s.num_tokens]
            positions += range(s.start, s.start + s.num_tokens)
            seqs.append([row, s.num_tokens, s.start, s.seq.block_table])
            if all_logits:
                rows += range(row, row + s.num_tokens)
            elif s.sample:
                rows.append(row + s.num_tokens - 1)
        fields = {"t_start": self.emu_now, "tokens": tokens, "positions": positions, "seqs": seqs,
                  "logit_rows": rows}
        futs = [self.cluster.control.submit(c, "step", {**fields, "want_output": c == 0}) for c in range(self.tp)]
        replies = [f.result() for f in futs]
        end = max(h["clock_ns"] for h, _ in replies)
        self.step_times.append(end - self.emu_now)
        self.emu_now = end
        header, frames = replies[0]
        if not rows or self.phantom:  # phantom cards compute nothing: greedy sampling sees token 0
            return torch.zeros(len(rows), self.cfg.vocab_size)
        return torch.frombuffer(bytearray(frames[0].buffer), dtype=torch.float32).view(*header["shape"])

    def prefill_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Logits at every position of one prompt (T, vocab), as a model's forward pass gives them."""
        from rsd_runtime.scheduler import ScheduledSeq

        seq = Sequence(seq_id=-1 - self.next_id, prompt_ids=list(prompt_ids), params=SamplingParams())
        self.next_id += 1
        if not self.blocks.can_allocate(seq, len(prompt_ids)):
            raise MemoryError("not enough free KV blocks for this prompt")
        self.blocks.allocate(seq, len(prompt_ids))
        try:
            return self.run(Batch([ScheduledSeq(seq, 0, len(prompt_ids), True)]), all_logits=True)
        finally:
            self.blocks.free(seq)

    def close(self) -> None:
        self.cluster.shutdown()


def resolve_model(model: str, phantom: bool, progress: bool = True):
    """(checkpoint or None, ModelConfig, tokenizer.json path or None).

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
        tok = path / "tokenizer.json"
        return None, ModelConfig.from_hf(json.loads((path / "config.json").read_text())), (
            tok if tok.is_file() else None)
    if model in MODEL_PRESETS:
        raise ValueError(f"{model!r} is a shape preset without weights: run it with phantom cards (--phantom)")
    ckpt = load_checkpoint(model, progress=progress)
    return ckpt, ckpt.config, ckpt.tokenizer_path
