"""Capacity accounting of a card's emulated device memory.

The weight arena and the KV cache draw from one pool whose size comes from the
device spec. Host pages are allocated only for what is written, but the pool's
limit is enforced as the real card would enforce it.
"""
from __future__ import annotations


class OutOfDeviceMemory(MemoryError):
    """An allocation larger than what is free on the card."""


def fmt_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


class DeviceMemory:
    def __init__(self, card: int, capacity: int):
        self.card = card
        self.capacity = int(capacity)
        self.used = 0

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def can_reserve(self, nbytes: int) -> bool:
        return nbytes <= self.free

    def reserve(self, nbytes: int, what: str) -> None:
        if not self.can_reserve(nbytes):
            raise OutOfDeviceMemory(
                f"card {self.card}: cannot allocate {fmt_bytes(nbytes)} for {what}: "
                f"{fmt_bytes(self.free)} free of {fmt_bytes(self.capacity)} "
                f"(missing {fmt_bytes(nbytes - self.free)})"
            )
        self.used += nbytes

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
        assert self.used >= 0, "released more device memory than reserved"
