"""Which KV-cache blocks each sequence owns.

The cards hold the memory; the host only decides ownership and sends each
sequence's block table with every step. Token i of a sequence lives in block
``block_table[i // block_size]`` at slot ``i % block_size``. There is no prefix
caching: a block belongs to at most one sequence, and that is checked.
"""
from __future__ import annotations

from collections import deque

from rsd_runtime.sequence import Sequence


class OutOfBlocks(RuntimeError):
    """allocate() was asked for more blocks than are free; call can_allocate() first."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # FIFO, as nano-vllm: a freed block is handed out again only after every block freed before it.
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: list[int | None] = [None] * num_blocks  # block -> seq_id

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_tokens_capacity(self) -> int:
        return self.num_blocks * self.block_size

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks seq needs so that its table covers seq.num_cached + num_new_tokens tokens."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        num_tokens = seq.num_cached + num_new_tokens
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.num_blocks_needed(seq, num_new_tokens)
        if needed > len(self._free):
            raise OutOfBlocks(f"seq {seq.seq_id} needs {needed} more KV blocks for {num_new_tokens} new tokens "
                              f"but only {len(self._free)} of {self.num_blocks} are free")
        for _ in range(needed):
            block = self._free.popleft()
            assert self._owner[block] is None, f"free block {block} is owned by seq {self._owner[block]}"
            self._owner[block] = seq.seq_id
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Return all of seq's blocks; a no-op for a sequence that holds none."""
        foreign = [b for b in seq.block_table if self._owner[b] != seq.seq_id]
        if foreign:
            raise RuntimeError(f"seq {seq.seq_id} lists blocks {foreign} it does not own (owners: "
                               f"{[self._owner[b] for b in foreign]}); its block table is corrupt")
        for block in seq.block_table:
            self._owner[block] = None
            self._free.append(block)
        seq.block_table.clear()

    def owner(self, block: int) -> int | None:
        """The seq_id that holds block, or None if it is free."""
        return self._owner[block]
