"""Card commands for a pool of experts: shards staged in a slower tier, copied into device memory on demand.

A card's staging tier (its DDR, or its share of host memory) is a weight arena
of its own: a shared-memory segment named after the tier, with its own
manifest and its own capacity. ``put`` with a ``tier`` field places a shard
there; ``activate`` copies one expert's shards into the device-memory arena
(real bytes, on a real card) after dropping the experts the host evicts. An
expert's tensors are named ``<expert>/<shard>`` in both tiers, and its command
stream reads them through that prefix (``weight_prefix``).

The emulated time of a copy is the host's to charge: it depends on what the
other cards copy at the same moment (``rsd_runtime.coe.SwitchPath``).
"""
from __future__ import annotations

from devices import fields
from devices.arena import WeightArena
from devices.shm import SHM_DIR, segment_name
from devices.tiers import TierCapacity, staging_tier


class ExpertOps:
    def __init__(self, card):
        self.card = card
        self.stores: dict[str, WeightArena] = {}

    def handlers(self) -> dict:
        return {"activate": self.op_activate}

    def store(self, tier: str) -> WeightArena:
        """The staging store of ``tier``, made on first use (re-attached on a restarted card)."""
        if tier not in self.stores:
            card = self.card
            memory = TierCapacity(card.card, staging_tier(card.spec, tier))
            attach = (SHM_DIR / segment_name(card.run_name, card.card, f"{tier}manifest")).exists()
            self.stores[tier] = WeightArena(card.run_name, card.card, memory, attach=attach,
                                            backed=not card.phantom, kind=tier)
        return self.stores[tier]

    def op_activate(self, h, frames):
        """Drop the ``evict`` experts from device memory, then copy ``expert``'s shards into it."""
        card, arena = self.card, self.card.arena
        expert = fields.text(h, "expert")
        store = self.store(fields.text(h, "tier"))
        for gone in h.get("evict", []):
            for name in arena.names_under(f"{gone}/").values():
                arena.free(name)
        staged = store.names_under(f"{expert}/")
        if not staged:
            raise KeyError(f"card {card.card}: no expert {expert!r} is staged in the {store.memory.tier} tier")
        copied = 0
        for name in staged.values():
            if name in arena.entries:  # already resident
                continue
            _, dtype, shape, nbytes = store.entries[name]
            arena.allocate(name, dtype, shape)
            if not card.phantom:
                arena.view(name)[:] = store.view(name)
            copied += nbytes
        return {"bytes": copied, "device_used": card.memory.used}, []

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
