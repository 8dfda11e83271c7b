"""The compiler: split a model over tp cards (Megatron style) and write each card's command stream.

Per card (tp rank r of tp):

* q/k/v_proj: split by heads (output rows). Key/value heads are split when tp
  divides them and replicated when tp exceeds them (tp a multiple of the kv
  heads): card r then holds kv head r // (tp / num_kv_heads), the one its
  query heads use.
* o_proj, down_proj: split by input columns ("row-parallel"), each followed by
  an all_reduce; their biases are added by card 0 only, before the reduction.
* gate/up_proj: split by output rows ("column-parallel").
* embed_tokens and lm_head: split by vocabulary, padded with zero rows to a
  multiple of tp; the embedding is summed over cards with an all_reduce, the
  logits gathered with an all_gather and cut back to the true vocabulary.

The model code (``devices/executor.py``) knows nothing of this: it runs ops.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from devices.fusion import FUSIONS
from rsd_runtime.model_config import ModelConfig

TP_CHOICES = (1, 2, 4, 8, 16)


class SplitError(ValueError):
    """A tensor-parallel degree that cannot work for this model."""


@dataclass(slots=True, frozen=True)
class Shard:
    """Rows (dim 0) or columns (dim 1) [start, end) of checkpoint tensor ``source``, zero-padded to ``size``."""

    name: str  # name in the card's arena
    source: str  # name in the checkpoint
    dim: int | None = None  # None: the whole tensor (replicated)
    start: int = 0
    end: int = 0
    size: int = 0  # rows/columns after padding (>= end - start)

    def extract(self, tensor):
        if self.dim is None:
            return tensor.contiguous()
        part = tensor.narrow(self.dim, self.start, self.end - self.start)
        if self.size > self.end - self.start:
            import torch

            shape = list(part.shape)
            shape[self.dim] = self.size - shape[self.dim]
            part = torch.cat([part, part.new_zeros(shape)], dim=self.dim)
        return part.contiguous()

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(full)
        out = list(full)
        out[self.dim] = self.size
        return tuple(out)


@dataclass(slots=True)
class CardProgram:
    rank: int  # tp rank
    tp: int
    card: int  # which card of the cluster runs it
    shards: list[Shard] = field(default_factory=list)
    ops: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # what the executor needs beyond the ops


def kv_heads_of(cfg: ModelConfig, tp: int, r: int = 0) -> tuple[int, int]:
    """(kv heads held, first kv head) on tp rank r: split when tp divides them, else replicated."""
    if tp <= cfg.num_kv_heads:
        return cfg.num_kv_heads // tp, r * (cfg.num_kv_heads // tp)
    return 1, r // (tp // cfg.num_kv_heads)


def valid_tp(cfg: ModelConfig, candidates=TP_CHOICES) -> list[int]:
    return [tp for tp in candidates if not _problems(cfg, tp)]


def _problems(cfg: ModelConfig, tp: int) -> list[str]:
    out = []
    if cfg.num_heads % tp:
        out.append(f"num_heads={cfg.num_heads} is not divisible by tp={tp}")
    if tp > cfg.num_heads:
        out.append(f"tp={tp} exceeds num_heads={cfg.num_heads}")
    kv = cfg.num_kv_heads
    if tp <= kv and kv % tp:
        out.append(f"num_kv_heads={kv} is not divisible by tp={tp}")
    if tp > kv and tp % kv:
        out.append(f"tp={tp} is not a multiple of num_kv_heads={kv} (kv heads cannot be replicated evenly)")
    if cfg.intermediate_size % tp:
        out.append(f"intermediate_size={cfg.intermediate_size} is not divisible by tp={tp}")
    return out


def check_tp(cfg: ModelConfig, tp: int) -> None:
    if not isinstance(tp, int) or tp < 1:
        raise SplitError(f"tensor-parallel degree must be a whole number >= 1, got {tp!r}")
    problems = _problems(cfg, tp)
    if problems:
        ok = valid_tp(cfg, sorted({*TP_CHOICES, *range(1, min(cfg.num_heads, 64) + 1)}))
        raise SplitError(f"cannot split this model over tp={tp}: {'; '.join(problems)}. "
                         f"tp values that work: {', '.join(map(str, ok))}")


def compile_model(cfg: ModelConfig, tp: int, cards: list[int] | None = None, *,
                  fusion: str = "none") -> list[CardProgram]:
    """One program per tp rank; ``cards`` (default 0..tp-1) are the cluster cards of this instance.
    ``fusion`` (none, ops, layer: ``devices.fusion``) says which ops launch together."""
    check_tp(cfg, tp)
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    cards = list(range(tp)) if cards is None else list(cards)
    if len(cards) != tp:
        raise SplitError(f"{len(cards)} cards given for tp={tp}")
    programs = [_card_program(cfg, tp, r, cards) for r in range(tp)]
    for prog in programs:
        prog.meta["fusion"] = fusion
    return programs


def _card_program(cfg: ModelConfig, tp: int, r: int, cards: list[int]) -> CardProgram:
    hd = cfg.head_dim
    h_local = cfg.num_heads // tp
    kv_local, kv_first = kv_heads_of(cfg, tp, r)
    i_local = cfg.intermediate_size // tp
    v_local = -(-cfg.vocab_size // tp)
    v_start, v_end = min(r * v_local, cfg.vocab_size), min((r + 1) * v_local, cfg.vocab_size)
    prog = CardProgram(rank=r, tp=tp, card=cards[r])
    add = prog.shards.append

    def rows(name, src, start, end, size=None):
        add(Shard(name, src, 0, start, end, size if size is not None else end - start))

    def cols(name, src, start, end):
        add(Shard(name, src, 1, start, end, end - start))

    rows("embed", "model.embed_tokens.weight", v_start, v_end, v_local)
    if not cfg.tie_word_embeddings:
        rows("lm_head", "lm_head.weight", v_start, v_end, v_local)
    add(Shard("norm", "model.norm.weight"))
    ops = [{"op": "embed", "w": "embed", "vocab_start": r * v_local, "out": "x"}]
    if tp > 1:
        ops.append({"op": "all_reduce", "buf": "x"})
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        add(Shard(f"l{i}.in_norm", p + "input_layernorm.weight"))
        add(Shard(f"l{i}.post_norm", p + "post_attention_layernorm.weight"))
        q_span = (r * h_local * hd, (r + 1) * h_local * hd)
        kv_span = (kv_first * hd, (kv_first + kv_local) * hd)
        for proj, span in (("q", q_span), ("k", kv_span), ("v", kv_span)):
            rows(f"l{i}.{proj}", p + f"self_attn.{proj}_proj.weight", *span)
            if cfg.qkv_bias:
                rows(f"l{i}.{proj}.b", p + f"self_attn.{proj}_proj.bias", *span)
        cols(f"l{i}.o", p + "self_attn.o_proj.weight", *q_span)
        o_bias = cfg.o_bias and r == 0
        if o_bias:
            add(Shard(f"l{i}.o.b", p + "self_attn.o_proj.bias"))
        i_span = (r * i_local, (r + 1) * i_local)
        for proj in ("gate", "up"):
            rows(f"l{i}.{proj}", p + f"mlp.{proj}_proj.weight", *i_span)
            if cfg.mlp_bias:
                rows(f"l{i}.{proj}.b", p + f"mlp.{proj}_proj.bias", *i_span)
        cols(f"l{i}.down", p + "mlp.down_proj.weight", *i_span)
        down_bias = cfg.mlp_bias and r == 0
        if down_bias:
            add(Shard(f"l{i}.down.b", p + "mlp.down_proj.bias"))
        b = (lambda name, on: name if on else None)
        ops += [
            {"op": "rmsnorm", "in": "x", "out": "h", "w": f"l{i}.in_norm"},
            {"op": "linear", "in": "h", "out": "q", "w": f"l{i}.q", "b": b(f"l{i}.q.b", cfg.qkv_bias)},
            {"op": "linear", "in": "h", "out": "k", "w": f"l{i}.k", "b": b(f"l{i}.k.b", cfg.qkv_bias)},
            {"op": "linear", "in": "h", "out": "v", "w": f"l{i}.v", "b": b(f"l{i}.v.b", cfg.qkv_bias)},
            {"op": "attention", "layer": i, "q": "q", "k": "k", "v": "v", "out": "a"},
            {"op": "linear", "in": "a", "out": "o", "w": f"l{i}.o", "b": b(f"l{i}.o.b", o_bias)},
        ]
        if tp > 1:
            ops.append({"op": "all_reduce", "buf": "o"})
        ops += [
            {"op": "add", "a": "x", "b": "o", "out": "x"},
            {"op": "rmsnorm", "in": "x", "out": "h", "w": f"l{i}.post_norm"},
            {"op": "linear", "in": "h", "out": "g", "w": f"l{i}.gate", "b": b(f"l{i}.gate.b", cfg.mlp_bias)},
            {"op": "linear", "in": "h", "out": "u", "w": f"l{i}.up", "b": b(f"l{i}.up.b", cfg.mlp_bias)},
            {"op": "silu_mul", "a": "g", "b": "u", "out": "m"},
            {"op": "linear", "in": "m", "out": "d", "w": f"l{i}.down", "b": b(f"l{i}.down.b", down_bias)},
        ]
        if tp > 1:
            ops.append({"op": "all_reduce", "buf": "d"})
        ops.append({"op": "add", "a": "x", "b": "d", "out": "x"})
    ops += [
        {"op": "rmsnorm", "in": "x", "out": "h", "w": "norm"},
        {"op": "select_rows", "in": "h", "out": "h"},
        {"op": "linear", "in": "h", "out": "logits", "w": "embed" if cfg.tie_word_embeddings else "lm_head",
         "b": None},
    ]
    if tp > 1:
        ops.append({"op": "all_gather", "buf": "logits"})
    ops.append({"op": "output", "buf": "logits", "cols": cfg.vocab_size})
    prog.ops = ops
    prog.meta = {"num_heads": h_local, "num_kv_heads": kv_local, "head_dim": hd, "vocab_local": v_local,
                 "intermediate_local": i_local, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
                 "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
                 "sliding_window": cfg.sliding_window, "group": cards, "tp_rank": r,
                 "vocab_size": cfg.vocab_size}
    return prog
