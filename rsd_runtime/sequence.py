"""A request as the scheduler sees it: its tokens, how many of them are in the KV cache, and its blocks."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from rsd_runtime.sampling_params import SamplingParams

FINISH_REASONS = ("length", "stop", "eos", "abort", "error")


class SeqStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


# eq=False: sequences are compared by identity, so removing one from a queue never removes its twin.
@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)  # physical KV block of each block_size tokens, in order
    num_cached: int = 0  # leading tokens of all_ids whose K/V are in the cache
    finish_reason: str | None = None  # one of FINISH_REASONS once finished
    num_preemptions: int = 0

    def __post_init__(self):
        self.prompt_ids = list(self.prompt_ids)
        self.output_ids = list(self.output_ids)
        if not self.prompt_ids:
            raise ValueError(f"seq {self.seq_id}: the prompt is empty; give at least one token")
        if not isinstance(self.params, SamplingParams):
            raise TypeError(f"seq {self.seq_id}: params must be SamplingParams, got {type(self.params).__name__}")
        if not 0 <= self.num_cached <= self.num_tokens:
            raise ValueError(f"seq {self.seq_id}: num_cached={self.num_cached} is outside [0, {self.num_tokens}]")

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_ids(self, start: int, stop: int) -> list[int]:
        """all_ids[start:stop] without building all_ids."""
        num_prompt = len(self.prompt_ids)
        if stop <= num_prompt:
            return self.prompt_ids[start:stop]
        if start >= num_prompt:
            return self.output_ids[start - num_prompt:stop - num_prompt]
        return self.prompt_ids[start:] + self.output_ids[:stop - num_prompt]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_uncached(self) -> int:
        """Tokens still to feed before the next token can be sampled."""
        return self.num_tokens - self.num_cached

    @property
    def last_token_id(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
