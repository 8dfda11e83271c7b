"""When a request stops, and what of its text may be shown: every stop rule lives here.

A request stops at the first of, checked after each sampled token:

* an eos id, unless ``ignore_eos`` (reason "eos"); one of its ``stop_token_ids`` ("stop");
* ``max_tokens`` output tokens, or the length cap: min(context, KV cache) tokens in all ("length");
* one of its ``stop`` strings in the decoded text ("stop"): the text is cut before the match
  (or after it, with ``include_stop_str_in_output``).

A natural stop outranks the length cap when both hold on the same token, as in vLLM v1. The
stopping token stays in the token ids.

Stop strings are matched on text that is held back: the end of the text that a stop string
starts with is released only once the string cannot be forming there any more, so no stream
ever shows a stop string (or its first letters).
"""
from __future__ import annotations

from rsd_runtime.sampling_params import SamplingParams
from rsd_runtime.sequence import Sequence


def token_stop(seq: Sequence, token: int, eos_ids: set[int], max_len: int) -> str | None:
    """The reason ``seq`` stops on its newest output ``token`` (already appended), or None."""
    p = seq.params
    if not p.ignore_eos and token in eos_ids:
        return "eos"
    if p.stop_token_ids and token in p.stop_token_ids:
        return "stop"
    if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= max_len:
        return "length"
    return None


class TextStop:
    """One request's text as it grows: releases what is safe to show, finds its stop strings.

        ts = TextStop(["\\n\\n"])
        ts.feed("Hello\\n")   # -> "Hello" ("\\n" is held: it may start "\\n\\n")
        ts.feed("\\nBye")     # -> ""      and ts.hit: the text ends before the match
    """

    def __init__(self, params: SamplingParams):
        self.stops = list(params.stop or ())
        self.include = params.include_stop_str_in_output
        self.pending = ""
        self.text = ""  # everything released so far
        self.hit = False

    def feed(self, new: str) -> str:
        """Add newly decoded text; returns the part of the text that may now be shown."""
        if self.hit or not new:
            return ""
        self.pending += new
        found = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if found:
            i, s = min(found)
            self.hit = True
            return self._release(i + len(s) if self.include else i)
        return self._release(len(self.pending) - self._forming())

    def _forming(self) -> int:
        """Length of the longest end of the pending text that a stop string starts with."""
        for n in range(min(len(self.pending), max(map(len, self.stops), default=1) - 1), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        """The request ended for another reason: the held-back text is shown after all."""
        return "" if self.hit else self._release(len(self.pending))

    def _release(self, upto: int) -> str:
        upto = max(0, upto)
        out, self.pending = self.pending[:upto], ("" if self.hit else self.pending[upto:])
        self.text += out
        return out
