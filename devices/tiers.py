"""Memory tiers of a card and the capacity held in each.

A card has on-chip SRAM and device memory (HBM or GDDR); some also have a DDR
tier beside it (SN40L-class sockets). A card without DDR reaches host memory
over its host link. ``TieredMemory`` enforces each tier's capacity on its own,
so an error names the tier that is full and how much is missing.
"""
from __future__ import annotations

from dataclasses import dataclass

from devices.memory import OutOfDeviceMemory, fmt_bytes


@dataclass(slots=True, frozen=True)
class MemoryTier:
    name: str  # "sram" | "device" | "ddr" | "host"
    capacity: int  # bytes
    bandwidth: float  # bytes/s read out of the tier (0 where it is never a copy source)


class OutOfTierMemory(OutOfDeviceMemory):
    """An allocation larger than what is free in one memory tier."""


class TieredMemory:
    """Bytes held per tier, each tier checked against its own capacity."""

    def __init__(self, card: int, tiers: dict[str, MemoryTier]):
        self.card = card
        self.tiers = dict(tiers)
        self.used = {name: 0 for name in tiers}

    def _tier(self, name: str) -> MemoryTier:
        try:
            return self.tiers[name]
        except KeyError:
            raise ValueError(f"card {self.card} has no memory tier {name!r}; "
                             f"its tiers: {', '.join(self.tiers)}") from None

    def free(self, tier: str) -> int:
        return self._tier(tier).capacity - self.used[tier]

    def can_reserve(self, tier: str, nbytes: int) -> bool:
        return nbytes <= self.free(tier)

    def reserve(self, tier: str, nbytes: int, what: str) -> None:
        free = self.free(tier)
        if nbytes > free:
            cap = self.tiers[tier].capacity
            raise OutOfTierMemory(
                f"card {self.card}: the {tier} tier cannot hold {fmt_bytes(nbytes)} for {what}: "
                f"{fmt_bytes(free)} free of {fmt_bytes(cap)} (missing {fmt_bytes(nbytes - free)})")
        self.used[tier] += nbytes

    def release(self, tier: str, nbytes: int) -> None:
        self._tier(tier)
        if nbytes > self.used[tier]:
            raise ValueError(f"card {self.card}: releasing {nbytes} bytes from the {tier} tier, "
                             f"which holds {self.used[tier]}")
        self.used[tier] -= nbytes
