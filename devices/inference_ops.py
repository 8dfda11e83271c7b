"""Card commands for inference: take a compiled program, run steps of it.

torch is imported only here, when a card first runs a model: cards that only
hold memory or run collectives start in a fraction of the time.
"""
from __future__ import annotations

from devices.kv_cache import KVLayout
from devices.step import PlanError, StepPlan


class InferenceOps:
    def __init__(self, card):
        self.card = card
        self.executor = None

    def handlers(self) -> dict:
        return {"load_program": self.op_load_program, "step": self.op_step}

    def op_load_program(self, h, frames):
        """Install a command stream; allocate the KV cache it needs (in shared memory)."""
        card = self.card
        layout = KVLayout(**h["kv"])
        if h.get("attach") and card.kv is not None and card.kv.layout == layout:
            kv = {"nbytes": layout.nbytes, "segment": card.kv.segment.name if card.kv.segment else None}
        else:
            kv = card.install_kv(layout)
        meta = h["program"]["meta"]
        group = card.collectives.group(meta["group"]) if len(meta["group"]) > 1 else None
        if card.phantom:
            from devices.phantom import PhantomExecutor

            names = card.arena.names_under(meta.get("weight_prefix", ""))
            shapes = {n: tuple(card.arena.entries[a][2]) for n, a in names.items()}
            self.executor = PhantomExecutor(card.clock, card.spec, shapes, h["program"], group)
        else:
            import torch

            from devices.executor import Executor

            torch.set_num_threads(int(h.get("threads", 1)))
            self.executor = Executor(card, h["program"], group)
        return {"kv_bytes": kv["nbytes"], "kv_segment": kv["segment"]}, []

    def op_step(self, h, frames):
        """Run one step of the loaded stream on the plan in frames[0] (the same bytes for every card)."""
        if self.executor is None:
            raise RuntimeError(f"card {self.card.card}: no program loaded")
        if len(frames) != 1:
            raise PlanError(f"a step carries one plan frame, got {len(frames)}")
        self.card.faults.before_step()
        card = self.card
        layout = card.kv.layout
        plan = StepPlan.unpack(frames[0].buffer, num_blocks=layout.num_blocks, block_size=layout.block_size,
                               vocab_size=self.executor.vocab_size, real=not card.phantom)
        card.clock.now = max(card.clock.now, plan.t_start)
        start = card.clock.now
        logits = self.executor.step(plan)
        reply = {"clock_ns": card.clock.now, "emu_ns": card.clock.now - start}
        if logits is not None and plan.output_rank == self.executor.rank:
            reply["shape"] = list(logits.shape)
            return reply, [logits.numpy()]
        return reply, []
