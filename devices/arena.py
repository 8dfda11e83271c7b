"""The weight arena: one shared-memory segment per card and its manifest.

The data segment spans the card's whole emulated memory (sparse on tmpfs, so
only written pages cost host memory). The manifest (tensor name -> offset,
dtype, shape) lives in a second, small segment so that a card restarted after
a crash finds its weights where it left them.

Manifest segment layout: a 16-byte header ``(active slot, length)`` and two
slots; a new manifest is written into the inactive slot before the header
flips to it, so a card killed mid-update leaves the previous manifest intact.
"""
from __future__ import annotations

import struct

import msgpack
import numpy as np

from devices.memory import DeviceMemory, fmt_bytes
from devices.shm import Segment, SegmentError, host_shm_free, segment_name
from interconnect import wire

ALIGN = 256  # bytes; keeps every tensor aligned for vector loads
MANIFEST_SLOT = 4 << 20  # room for ~40k entries per slot
_HDR = struct.Struct("<QQ")


class ArenaError(KeyError):
    def __str__(self):
        return str(self.args[0])


class WeightArena:
    """``kind``: what the data segment holds, ``weights`` (device memory) or a staging tier (``ddr``,
    ``host``), each with its own manifest; ``memory`` enforces that store's capacity."""

    def __init__(self, run: str, card: int, memory: DeviceMemory, *, attach: bool = False, backed: bool = True,
                 kind: str = "weights"):
        self.card = card
        self.memory = memory
        self.backed = backed
        self.entries: dict[str, list] = {}  # name -> [offset, dtype, shape, nbytes]
        self.meta: dict = {}  # other persistent card state (the KV layout, ...)
        create = not attach
        manifest = "manifest" if kind == "weights" else f"{kind}manifest"
        self.manifest = Segment(segment_name(run, card, manifest), _HDR.size + 2 * MANIFEST_SLOT, create=create)
        self.data = None
        if backed:
            self.data = Segment(segment_name(run, card, kind), memory.capacity, create=create)
        if attach:
            self._load_manifest()
        else:
            self._save_manifest()

    # -- manifest -------------------------------------------------------------
    def _load_manifest(self) -> None:
        slot, length = _HDR.unpack_from(self.manifest.buf, 0)
        if length == 0:
            return
        start = _HDR.size + slot * MANIFEST_SLOT
        doc = msgpack.unpackb(self.manifest.buf[start : start + length], raw=False)
        self.entries = doc["entries"]
        self.meta = doc.get("meta", {})
        self.memory.reserve(self.used, f"re-attached weights of card {self.card}")

    def _save_manifest(self) -> None:
        blob = msgpack.packb({"entries": self.entries, "meta": self.meta}, use_bin_type=True)
        if len(blob) > MANIFEST_SLOT:
            raise SegmentError(f"card {self.card}: manifest of {len(blob)} bytes exceeds its slot")
        slot, _ = _HDR.unpack_from(self.manifest.buf, 0)
        new = 1 - slot
        start = _HDR.size + new * MANIFEST_SLOT
        self.manifest.buf[start : start + len(blob)] = blob
        _HDR.pack_into(self.manifest.buf, 0, new, len(blob))

    def set_meta(self, key: str, value) -> None:
        self.meta[key] = value
        self._save_manifest()

    # -- allocation -----------------------------------------------------------
    @property
    def used(self) -> int:
        return sum(_aligned(e[3]) for e in self.entries.values())

    def _find_gap(self, size: int) -> int:
        cursor = 0
        for off, _, _, nb in sorted(self.entries.values()):
            if off - cursor >= size:
                return cursor
            cursor = off + _aligned(nb)
        if cursor + size > self.memory.capacity:
            raise SegmentError(f"card {self.card}: arena too fragmented for {fmt_bytes(size)}")
        return cursor

    def allocate(self, name: str, dtype: str, shape) -> int:
        if name in self.entries:
            raise ArenaError(f"card {self.card}: tensor {name!r} is already in the arena")
        nbytes = wire.nbytes_of(dtype, shape)
        size = _aligned(nbytes)
        self.memory.reserve(size, f"tensor {name!r} ({dtype}{list(shape)})")
        if self.backed and size > host_shm_free():
            self.memory.release(size)
            raise SegmentError(
                f"card {self.card}: host shared memory has {fmt_bytes(host_shm_free())} free, "
                f"tensor {name!r} needs {fmt_bytes(size)}"
            )
        try:
            off = self._find_gap(size)
        except SegmentError:
            self.memory.release(size)
            raise
        self.entries[name] = [off, dtype, list(shape), nbytes]
        self._save_manifest()
        return off

    def free(self, name: str) -> None:
        entry = self._entry(name)
        del self.entries[name]
        self.memory.release(_aligned(entry[3]))
        self._save_manifest()

    def _entry(self, name: str) -> list:
        try:
            return self.entries[name]
        except KeyError:
            raise ArenaError(f"card {self.card}: no tensor {name!r} in the arena") from None

    def view(self, name: str) -> np.ndarray:
        """The tensor's bytes in the arena, as a flat uint8 array (no copy)."""
        off, _, _, nbytes = self._entry(name)
        if not self.backed:
            raise ArenaError(f"card {self.card}: arena holds no real bytes (phantom card)")
        return np.frombuffer(self.data.buf, np.uint8, nbytes, off)

    def write(self, name: str, payload) -> None:
        src = memoryview(payload).cast("B")
        dst = self.view(name)
        if src.nbytes != dst.nbytes:
            raise ArenaError(f"card {self.card}: {name!r} holds {dst.nbytes} bytes, payload has {src.nbytes}")
        dst[:] = np.frombuffer(src, np.uint8)

    def names_under(self, prefix: str) -> dict[str, str]:
        """Tensors whose names start with ``prefix``: name without it -> name in the arena."""
        return {n[len(prefix):]: n for n in self.entries if n.startswith(prefix)}

    def tensor(self, name: str, *, as_torch: bool = False):
        _, dtype, shape, _ = self._entry(name)
        return wire.from_wire(self.view(name), dtype, shape, as_torch=as_torch)

    def describe(self, name: str) -> dict:
        off, dtype, shape, nbytes = self._entry(name)
        return {"name": name, "offset": off, "dtype": dtype, "shape": shape, "nbytes": nbytes}

    def close(self) -> None:
        self.manifest.close()
        if self.data is not None:
            self.data.close()


def _aligned(n: int) -> int:
    return max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)
