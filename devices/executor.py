"""The card's executor: runs its command stream for one step, with torch on the CPU.

A step feeds a flat batch of tokens (several sequences, each a prefill chunk
or one decode token) through the ops the compiler wrote for this card. Buffers
live in a per-step environment; collectives go to the peer cards directly.
Every op also advances the card's emulated clock by the cost model
(``devices.step``); a phantom card does only that (``devices.phantom``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from devices import rope
from devices.program import StepProgram
from devices.schedule import WHOLE, chunk_count, split_plan, walk
from devices.step import StepPlan
from interconnect import collectives as coll
from interconnect.group import ProcessGroup

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Executor:
    def __init__(self, card, program: dict, group: ProcessGroup | None):
        self.card = card
        self.ops = program["ops"]
        m = self.meta = program["meta"]
        self.group = group
        self.rank = m["tp_rank"]
        self.vocab_size = m["vocab_size"]
        self.dtype = _TORCH[m["compute_dtype"]]
        self.dtype_name = m["compute_dtype"]
        self.h, self.kvh, self.hd = m["num_heads"], m["num_kv_heads"], m["head_dim"]
        self.eps = m["rms_norm_eps"]
        self.window = m.get("sliding_window")
        self.freq = rope.inv_freq(self.hd, m["rope_theta"], m.get("rope_scaling"))
        self.w: dict[str, torch.Tensor] = {}
        names = card.arena.names_under(m.get("weight_prefix", ""))  # one expert's weights when many are resident
        for name, stored in names.items():
            t = card.arena.tensor(stored, as_torch=True)
            self.w[name] = t if t.dtype == self.dtype else t.to(self.dtype)
        shapes = {n: tuple(card.arena.entries[a][2]) for n, a in names.items()}
        self.program = StepProgram(self.ops, m, card.spec, shapes)
        self.kv = card.kv.tensors()
        self.calls = [(getattr(self, "op_" + op["op"]), op) for op in self.ops]  # looked up once, run every step
        if self.dtype == torch.float32:  # F.rms_norm is HF's RMSNorm bit for bit in float32 (not below it)
            self.calls = [(self._rmsnorm_f32 if fn == self.op_rmsnorm else fn, op) for fn, op in self.calls]

    # -- one step ---------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, step: StepPlan) -> torch.Tensor | None:
        """Run the step's tasks on the card's engines (``devices.schedule``); the logits, if this card
        returns them. Each chunk of the step's rows keeps its own buffers; the tail runs on all rows."""
        k = chunk_count(step, step.chunks)
        tasks, prog, clock, calls = self.program.tasks(k), self.program, self.card.clock, self.calls
        chunks = [_Context(p, self) for p in split_plan(step, k)]
        whole = chunks[0] if k == 1 else None
        out = None

        def compute(i, start):
            nonlocal whole, out
            task = tasks[i]
            if task.chunk == WHOLE and whole is None:
                whole = _Context(step, self)
                whole.env.update({n: torch.cat([c.env[n] for c in chunks]) for n in prog.tail_inputs})
            ctx = whole if task.chunk == WHOLE else chunks[task.chunk]
            ctx.enter(self)
            env = ctx.env
            for j in task.ops:
                fn, op = calls[j]
                got = fn(op, env)
                if got is not None:
                    out = got
            return start + prog.compute_ns(task.ops, ctx.plan)

        def collective(i, start):
            task = tasks[i]
            ctx = whole if task.chunk == WHOLE else chunks[task.chunk]
            ctx.enter(self)
            clock.now = start
            fn, op = calls[task.ops[0]]
            fn(op, ctx.env)
            return clock.now

        clock.now = max(walk(tasks, clock.now, compute, collective).values())
        return out

    def op_embed(self, op, env):
        v_local = self.w[op["w"]].shape[0]
        local = env["tokens"] - op["vocab_start"]
        inside = (local >= 0) & (local < v_local)
        x = self.w[op["w"]][local.clamp(0, v_local - 1)]
        env[op["out"]] = torch.where(inside[:, None], x, torch.zeros((), dtype=x.dtype))

    def op_rmsnorm(self, op, env):
        x = env[op["in"]]
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        env[op["out"]] = self.w[op["w"]] * xf.to(x.dtype)

    def _rmsnorm_f32(self, op, env):
        x = env[op["in"]]
        env[op["out"]] = F.rms_norm(x, (x.shape[-1],), self.w[op["w"]], self.eps)

    def op_linear(self, op, env):
        env[op["out"]] = F.linear(env[op["in"]], self.w[op["w"]], self.w[op["b"]] if op.get("b") else None)

    def op_add(self, op, env):
        env[op["out"]] = env[op["a"]] + env[op["b"]]

    def op_silu_mul(self, op, env):
        env[op["out"]] = F.silu(env[op["a"]]) * env[op["b"]]

    def op_select_rows(self, op, env):
        env[op["out"]] = env[op["in"]][self.rows]

    def op_attention(self, op, env):
        T, h, kvh, hd = self.T, self.h, self.kvh, self.hd
        q = rope.apply(env[op["q"]].view(T, h, hd), self.cos, self.sin)
        k = rope.apply(env[op["k"]].view(T, kvh, hd), self.cos, self.sin)
        v = env[op["v"]].view(T, kvh, hd)
        k_cache, v_cache = self.kv[0][op["layer"]], self.kv[1][op["layer"]]  # (blocks, bs, kvh, hd)
        rows = self.decode[5] if self.decode is not None else None
        if self.decode is not None and rows is None:  # every sequence decodes one token
            env[op["out"]] = self._decode_attention(q, k, v, k_cache, v_cache)
            return
        bs = k_cache.shape[1]
        out = torch.empty(T, h * hd, dtype=q.dtype)
        if rows is not None:  # the one-token sequences of a mixed step, batched as a decode step's
            out[rows] = self._decode_attention(q[rows], k[rows], v[rows], k_cache, v_cache)
        for s in self.seqs:
            if rows is not None and s.num_tokens == 1:
                continue
            row, n, p0 = s.row, s.num_tokens, s.start
            pos = torch.arange(p0, p0 + n)
            table = torch.tensor(s.block_table, dtype=torch.int64)
            k_cache[table[pos // bs], pos % bs] = k[row:row + n]
            v_cache[table[pos // bs], pos % bs] = v[row:row + n]
            ctx = p0 + n
            nb = -(-ctx // bs)
            keys = k_cache[table[:nb]].reshape(nb * bs, kvh, hd)[:ctx].transpose(0, 1)
            vals = v_cache[table[:nb]].reshape(nb * bs, kvh, hd)[:ctx].transpose(0, 1)
            kpos = torch.arange(ctx)
            allowed = kpos[None, :] <= pos[:, None]
            if self.window:
                allowed &= (pos[:, None] - kpos[None, :]) < self.window
            o = F.scaled_dot_product_attention(q[row:row + n].transpose(0, 1), keys, vals, attn_mask=allowed,
                                               enable_gqa=h != kvh)  # kv heads shared without copies
            out[row:row + n] = o.transpose(0, 1).reshape(n, h * hd)
        env[op["out"]] = out

    def _decode_plan(self, step: StepPlan, bs: int):
        """Index tensors shared by every layer of a step for its one-token sequences (decodes), or None
        if it has none; the last item is their rows, or None when every sequence of the step is one.

        Each sequence's blocks are gathered into a (seqs, max blocks x block size) window padded
        with block 0; the mask hides the padding and, with a sliding window, what fell out of it.
        """
        seqs = [s for s in step.seqs if s.num_tokens == 1]
        if not seqs:
            return None
        rows = None if len(seqs) == len(step.seqs) else torch.tensor([s.row for s in seqs], dtype=torch.int64)
        pos = torch.tensor([s.start for s in seqs], dtype=torch.int64)  # (S,)
        nb = max(-(-(s.start + 1) // bs) for s in seqs)
        tables = torch.tensor([s.block_table[:nb] + [0] * (nb - len(s.block_table[:nb])) for s in seqs],
                              dtype=torch.int64)  # (S, nb)
        kpos = torch.arange(nb * bs)
        allowed = kpos[None, :] <= pos[:, None]
        if self.window:
            allowed &= (pos[:, None] - kpos[None, :]) < self.window
        at = torch.arange(len(seqs))
        return pos, tables, tables[at, pos // bs], pos % bs, allowed[:, None, None, :], rows

    def _decode_attention(self, q, k, v, k_cache, v_cache):
        """All sequences of a decode step in one batched attention (q, k, v: (S, heads, hd))."""
        S, h, kvh, hd = q.shape[0], self.h, self.kvh, self.hd
        pos, tables, blk, slot, mask, _ = self.decode
        k_cache[blk, slot] = k
        v_cache[blk, slot] = v
        bs = k_cache.shape[1]
        ctx = tables.shape[1] * bs
        keys = k_cache[tables].reshape(S, ctx, kvh, hd).transpose(1, 2)  # (S, kvh, ctx, hd)
        vals = v_cache[tables].reshape(S, ctx, kvh, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q[:, :, None, :], keys, vals, attn_mask=mask,
                                           enable_gqa=h != kvh)  # (S, h, 1, hd)
        return o.reshape(S, h * hd)

    # -- collectives ---------------------------------------------------------------------
    def _numpy(self, t: torch.Tensor) -> np.ndarray:
        t = t.contiguous()
        return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy().reshape(-1)

    def op_all_reduce(self, op, env):
        t = env[op["buf"]].contiguous()
        coll.all_reduce(self._numpy(t), "sum", self.group, dtype=self.dtype_name)
        env[op["buf"]] = t

    def op_all_gather(self, op, env):
        n, v_local = self.group.size, self.meta["vocab_local"]
        rows = len(self.rows)
        t = env[op["buf"]].contiguous()
        out = torch.empty((n,) + tuple(t.shape), dtype=t.dtype)
        coll.all_gather(self._numpy(out), self._numpy(t), self.group, dtype=self.dtype_name)
        env[op["buf"]] = out.permute(1, 0, 2).reshape(rows, n * v_local)

    def op_output(self, op, env):
        return env[op["buf"]][:, :op["cols"]].to(torch.float32).contiguous()


class _Context:
    """One chunk of a step (or the whole step): its plan, buffers, RoPE tables and decode indices."""

    def __init__(self, plan: StepPlan, ex: Executor):
        self.plan = plan
        positions = torch.from_numpy(plan.positions)
        self.env = {"tokens": torch.from_numpy(plan.token_ids.astype(np.int64)), "positions": positions}
        self.rows = torch.tensor(plan.logit_rows, dtype=torch.int64)
        self.cos, self.sin = rope.tables(positions, ex.freq, ex.dtype)
        self.decode = ex._decode_plan(plan, ex.kv[0].shape[2])

    def enter(self, ex: Executor) -> None:
        ex.shape, ex.seqs, ex.T, ex.rows = self.plan, self.plan.seqs, self.plan.num_tokens, self.rows
        ex.cos, ex.sin, ex.decode = self.cos, self.sin, self.decode
