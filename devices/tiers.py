"""Memory tiers of a card and the capacity held in each.

A card has on-chip SRAM and device memory (HBM or GDDR); some also have a DDR
tier beside it (SN40L-class sockets). A card without DDR reaches host memory
over its host link. ``TieredMemory`` enforces each tier's capacity on its own,
so an error names the tier that is full and how much is missing.
"""
from __future__ import annotations

from dataclasses import dataclass

from devices.memory import DeviceMemory, OutOfDeviceMemory, fmt_bytes

# NVIDIA DGX H100 datasheet: 2 TB of system memory for 8 GPUs; a card without a DDR tier stages its
# experts in its share of host memory.
HOST_BYTES_PER_CARD = (2 << 40) // 8


@dataclass(slots=True, frozen=True)
class MemoryTier:
    name: str  # "sram" | "device" | "ddr" | "host"
    capacity: int  # bytes
    bandwidth: float  # bytes/s read out of the tier (0 where it is never a copy source)


class OutOfTierMemory(OutOfDeviceMemory):
    """An allocation larger than what is free in one memory tier."""


def tier_full(card: int, tier: str, nbytes: int, free: int, capacity: int, what: str) -> OutOfTierMemory:
    return OutOfTierMemory(
        f"card {card}: the {tier} tier cannot hold {fmt_bytes(nbytes)} for {what}: "
        f"{fmt_bytes(free)} free of {fmt_bytes(capacity)} (missing {fmt_bytes(nbytes - free)})")


def staging_tier(spec, name: str) -> MemoryTier:
    """The tier experts are staged in on a card of ``spec``: its DDR, or its share of host memory."""
    if name == "host":
        return MemoryTier("host", HOST_BYTES_PER_CARD, 0.0)
    if name != "ddr":
        raise ValueError(f"unknown staging tier {name!r}; experts are staged in 'ddr' or 'host'")
    return spec.tier("ddr")  # names the missing tier on a card without one


class TierCapacity(DeviceMemory):
    """One tier's capacity with the interface of ``DeviceMemory`` (a weight arena draws from it);
    its errors name the tier."""

    def __init__(self, card: int, tier: MemoryTier):
        super().__init__(card, tier.capacity)
        self.tier = tier.name

    def reserve(self, nbytes: int, what: str) -> None:
        if not self.can_reserve(nbytes):
            raise tier_full(self.card, self.tier, nbytes, self.free, self.capacity, what)
        self.used += nbytes


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
            raise tier_full(self.card, tier, nbytes, free, self.tiers[tier].capacity, what)
        self.used[tier] += nbytes

    def release(self, tier: str, nbytes: int) -> None:
        self._tier(tier)
        if nbytes > self.used[tier]:
            raise ValueError(f"card {self.card}: releasing {nbytes} bytes from the {tier} tier, "
                             f"which holds {self.used[tier]}")
        self.used[tier] -= nbytes
