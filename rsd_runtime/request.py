"""A request as the engine holds it while it lives: its sequence, text, generator and times.

Everything the engine knows about a request lives here and goes with it when it
finishes; the engine keeps no table that grows with the number of requests served.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rsd_runtime.outputs import RequestOutput, TokenLogprob, timing
from rsd_runtime.sequence import Sequence
from rsd_runtime.stopping import TextStop
from rsd_runtime.tokenizer import IncrementalDecoder


@dataclass(slots=True, eq=False)
class Request:
    request_id: str | int
    prompt: str | None
    seq: Sequence
    generator: torch.Generator | None
    decoder: IncrementalDecoder | None
    text_stop: TextStop
    arrival: float = field(default_factory=time.perf_counter)  # wall clock
    emu_arrival: int = 0  # emulated clock, ns
    scheduled: float | None = None  # when it first ran on the cards
    emu_scheduled: int | None = None
    token_times: list[float] = field(default_factory=list)
    emu_token_times: list[int] = field(default_factory=list)
    # what has not been returned yet
    new_tokens: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def params(self):
        return self.seq.params

    def add_token(self, token: int, logprob: TokenLogprob | None, now: float, emu_now: int) -> None:
        self.new_tokens.append(token)
        self.token_times.append(now)
        self.emu_token_times.append(emu_now)
        if logprob is not None:
            self.new_logprobs.append(logprob)
        if self.decoder is not None:
            self.new_text += self.text_stop.feed(self.decoder.feed(token))

    def output(self, now: float, emu_now: int) -> RequestOutput:
        """The delta since the last output; with the timings if the request has finished."""
        seq = self.seq
        finished = seq.is_finished
        if finished and self.decoder is not None:
            self.new_text += self.text_stop.flush()
        out = RequestOutput(
            self.request_id, self.prompt, seq.prompt_ids, self.new_tokens,
            self.new_text if self.decoder is not None else None, seq.finish_reason, finished,
            self.new_logprobs if seq.params.logprobs is not None else None, seq.num_output_tokens, now, emu_now)
        if finished:
            out.metrics = {"num_prompt_tokens": seq.num_prompt_tokens, "num_output_tokens": seq.num_output_tokens,
                           **timing(self.arrival, self.token_times, self.emu_arrival, self.emu_token_times,
                                    scheduled=self.scheduled, emu_scheduled=self.emu_scheduled)}
        self.new_tokens, self.new_text, self.new_logprobs = [], "", []
        return out
