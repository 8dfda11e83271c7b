"""The paged KV cache of a card, in its own shared-memory segment.

Layout (one contiguous array)::

    (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
                 ^ 0 = keys, 1 = values

A sequence owns whole blocks; which blocks is decided on the host (the block
manager) and sent with every step, so the card itself keeps no per-sequence
state. Other processes may map the segment read-only to inspect the cache.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from devices.memory import DeviceMemory
from devices.shm import Segment, SegmentError, host_shm_free, segment_name
from interconnect import wire


@dataclass(slots=True, frozen=True)
class KVLayout:
    num_layers: int
    num_blocks: int
    block_size: int  # tokens per block
    num_kv_heads: int  # kv heads held by this card
    head_dim: int
    dtype: str = "float32"

    def __post_init__(self):
        for f in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            if type(getattr(self, f)) is not int or getattr(self, f) < 1:
                raise ValueError(f"KV layout: {f} must be >= 1, got {getattr(self, f)}")
        wire.check_dtype(self.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def nbytes(self) -> int:
        return wire.nbytes_of(self.dtype, self.shape)

    @property
    def block_bytes(self) -> int:
        """Bytes one block costs over all layers, keys and values."""
        return self.nbytes // self.num_blocks

    def to_dict(self) -> dict:
        return asdict(self)


class KVCacheStore:
    def __init__(self, run: str, card: int, memory: DeviceMemory, layout: KVLayout, *,
                 attach: bool = False, backed: bool = True):
        self.card = card
        self.layout = layout
        self.memory = memory
        self.segment = None
        memory.reserve(layout.nbytes, f"KV cache of {layout.num_blocks} blocks")
        if backed:
            if not attach and layout.nbytes > host_shm_free():
                memory.release(layout.nbytes)
                raise SegmentError(f"card {card}: host shared memory cannot hold a KV cache of {layout.nbytes} bytes")
            self.segment = Segment(segment_name(run, card, "kv"), layout.nbytes, create=not attach)

    def array(self) -> np.ndarray:
        """The whole cache (storage dtype; bfloat16 appears as uint16)."""
        np_dtype = wire.DTYPES[self.layout.dtype][0]
        return np.frombuffer(self.segment.buf, np_dtype, int(np.prod(self.layout.shape))).reshape(self.layout.shape)

    def tensors(self):
        """(keys, values) as torch tensors over the shared memory, each (L, blocks, bs, kvh, hd)."""
        t = wire.from_wire(self.array().reshape(-1).view(np.uint8), self.layout.dtype, self.layout.shape, as_torch=True)
        return t[:, 0], t[:, 1]

    def release(self, *, unlink: bool) -> None:
        self.memory.release(self.layout.nbytes)
        if self.segment is not None:
            self.segment.close()
            if unlink:
                self.segment.unlink()
