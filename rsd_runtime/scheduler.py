"""Continuous batching with chunked prefill over a paged KV cache; plain Python, no tensors.

One step is ``schedule()`` -> the engine runs the batch and samples -> ``postprocess()``;
the engine then finishes the sequences that stop (``rsd_runtime.stopping``).

Policy (the shape of vLLM v1's scheduler):

* Running sequences first, in admission order. Each gets its next chunk:
  ``min(tokens not yet cached, chunk_size, tokens left in the step budget)``,
  which is 1 for a sequence in decode and up to chunk_size for one still in
  prefill. Once the budget is spent, the rest sit this step out (they keep
  their blocks).
* If a running sequence cannot get the blocks for its chunk, the most recently
  admitted running sequence that is not yet in this step's batch is preempted
  by recompute: its blocks are freed, num_cached drops to 0 and it goes back to
  the front of the waiting queue, keeping its output tokens; when readmitted it
  prefills prompt + output again and samples where it left off. This repeats
  until the chunk fits; if the sequence itself is the most recent one left, it
  preempts itself. Older sequences therefore always make progress.
* Then, unless something was preempted in this step (readmitting at once would
  only thrash), waiting sequences are admitted first come, first served while
  there is room: fewer than max_num_seqs running, budget left, and free blocks
  for the first chunk. The head of the queue blocks those behind it, so a long
  prompt is not overtaken forever by short ones.
* A sequence may grow only to what the whole cache holds (``max_len``): the
  engine finishes it with "length" at min(max_model_len, num_blocks *
  block_size) tokens, so a sequence running alone can always get its blocks.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rsd_runtime.block_manager import BlockManager
from rsd_runtime.sequence import FINISH_REASONS, Sequence, SeqStatus


@dataclass(slots=True)
class ScheduledSeq:
    """Feed seq's tokens [start, start + num_tokens); sample when that reaches the last known token."""
    seq: Sequence
    start: int
    num_tokens: int
    sample: bool

    def __post_init__(self):
        if self.start < 0 or self.num_tokens < 1:
            raise ValueError(f"seq {self.seq.seq_id}: need start >= 0 and num_tokens >= 1, "
                             f"got start={self.start}, num_tokens={self.num_tokens}")

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids(self.start, self.start + self.num_tokens)

    @property
    def positions(self) -> range:
        return range(self.start, self.start + self.num_tokens)


@dataclass(slots=True)
class Batch:
    seqs: list[ScheduledSeq]
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting while building this batch

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)


MAX_NUM_SEQS = 16  # requests in the running batch at most, unless told otherwise


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int = MAX_NUM_SEQS,
                 max_num_batched_tokens: int = 512, chunk_size: int = 256):
        if min(max_num_seqs, max_num_batched_tokens, chunk_size) < 1:
            raise ValueError(f"max_num_seqs, max_num_batched_tokens and chunk_size must be >= 1, got "
                             f"{max_num_seqs}, {max_num_batched_tokens}, {chunk_size}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk_size = chunk_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is the first to be preempted
        self._live_ids: set[int] = set()

    def add(self, seq: Sequence) -> None:
        if seq.status is not SeqStatus.WAITING or seq.num_cached or seq.block_table:
            raise ValueError(f"seq {seq.seq_id} must be new: status WAITING, nothing cached, no blocks "
                             f"(got {seq.status.name}, num_cached={seq.num_cached}, {len(seq.block_table)} blocks)")
        if seq.seq_id in self._live_ids:
            raise ValueError(f"seq_id {seq.seq_id} is already in the scheduler")
        capacity = self.block_manager.num_tokens_capacity
        if seq.num_tokens > capacity:
            raise ValueError(f"seq {seq.seq_id} has {seq.num_tokens} tokens but the whole KV cache holds "
                             f"{capacity} ({self.block_manager.num_blocks} blocks of {self.block_manager.block_size})")
        self._live_ids.add(seq.seq_id)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch | None:
        """The next batch, or None when no sequence is left."""
        if not self.has_unfinished():
            return None
        budget = self.max_num_batched_tokens
        batch = Batch([])
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncached, self.chunk_size, budget)
            while not self.block_manager.can_allocate(seq, num_new):
                # Sequences before i are already in the batch, so the victim is never one of them.
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.seqs.append(self._chunk(seq, num_new))
                budget -= num_new
                i += 1

        while (not batch.preempted and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            num_new = min(seq.num_uncached, self.chunk_size, budget)
            if not self.block_manager.can_allocate(seq, num_new):
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(self._chunk(seq, num_new))
            budget -= num_new

        if not batch.seqs:
            bm = self.block_manager
            raise RuntimeError(f"scheduler stalled: {len(self.waiting)} waiting, {len(self.running)} running, "
                               f"{bm.num_free_blocks} of {bm.num_blocks} blocks free; are blocks held outside "
                               f"this scheduler?")
        return batch

    def _chunk(self, seq: Sequence, num_new: int) -> ScheduledSeq:
        assert num_new >= 1, f"seq {seq.seq_id} has nothing to feed"
        self.block_manager.allocate(seq, num_new)
        start = seq.num_cached
        return ScheduledSeq(seq, start, num_new, sample=start + num_new == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_cached = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        # appendleft in reverse admission order (victims come from the back) keeps the queue's front in
        # admission order.
        self.waiting.appendleft(seq)

    def postprocess(self, batch: Batch, sampled: dict[int, int]) -> None:
        """Account for a batch that ran: its chunks are cached, each sampling sequence gets its token.

        sampled maps seq_id -> next token for every scheduled seq with sample=True. Whether a
        sequence stops on it is decided by the engine (``rsd_runtime.stopping``), which calls finish().
        """
        for s in batch.seqs:
            seq = s.seq
            if seq.is_finished:  # finished by the engine (e.g. aborted) while the batch ran
                continue
            if s.start != seq.num_cached:
                raise RuntimeError(f"seq {seq.seq_id}: batch fed tokens from {s.start} but {seq.num_cached} "
                                   f"are cached; was postprocess skipped or called twice?")
            seq.num_cached += s.num_tokens
            if not s.sample:
                continue
            if seq.seq_id not in sampled:
                raise KeyError(f"seq {seq.seq_id} was scheduled to sample but no token was given for it")
            seq.output_ids.append(sampled[seq.seq_id])

    @property
    def max_len(self) -> int:
        """The most tokens a sequence may hold: what the whole KV cache holds."""
        return self.block_manager.num_tokens_capacity

    def finish(self, seq: Sequence, reason: str) -> None:
        """End seq now (the engine calls this on a stop string, or "abort"); frees its blocks.

        Finishing a sequence that has already finished does nothing.
        """
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        if seq.is_finished:
            return
        queue = self.running if seq.status is SeqStatus.RUNNING else self.waiting
        if seq not in queue:
            raise ValueError(f"seq {seq.seq_id} is not in this scheduler")
        queue.remove(seq)
        self.block_manager.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self._live_ids.discard(seq.seq_id)
