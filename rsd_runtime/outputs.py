"""What the engine returns about a request: a delta per step, with its timings on both clocks.

``LLMEngine.step()`` returns one ``RequestOutput`` per request that produced something in
that step: the new token ids and the newly releasable text (held back while a stop string
could still be forming). The last one has ``finished=True``, its finish reason and the
request's timings. ``LLM.generate`` merges the deltas into one cumulative output.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at that position, most likely first


@dataclass(slots=True)
class RequestOutput:
    request_id: str | int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # new in this output (a delta), or all of them once merged
    text: str | None  # likewise; None when the model has no tokenizer
    finish_reason: str | None = None  # "length", "stop", "eos", "abort", "error" once finished
    finished: bool = False
    logprobs: list[TokenLogprob] | None = None
    num_output_tokens: int = 0  # output tokens so far, this delta included
    time: float = 0.0  # wall clock (time.perf_counter) when the step that made it ended
    emu_time_ns: int = 0  # emulated clock then
    error: str | None = None  # why a request ended with "error"
    metrics: dict = field(default_factory=dict)  # timings, filled once finished

    def merge(self, delta: "RequestOutput") -> None:
        """Append a later delta of the same request."""
        self.token_ids += delta.token_ids
        if self.text is not None and delta.text is not None:
            self.text += delta.text
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        for f in ("finish_reason", "finished", "num_output_tokens", "time", "emu_time_ns", "error", "metrics"):
            setattr(self, f, getattr(delta, f))

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "prompt": self.prompt, "prompt_token_ids": self.prompt_token_ids,
                "token_ids": self.token_ids, "text": self.text, "finish_reason": self.finish_reason,
                **({"error": self.error} if self.error else {}), **self.metrics}


def timing(arrival: float, token_times: list[float], emu_arrival: int, emu_token_times: list[int], *,
           scheduled: float | None = None, emu_scheduled: int | None = None) -> dict:
    """TTFT, TPOT = (latency - TTFT) / (tokens - 1), mean ITL, end-to-end latency and queue time,
    on the wall clock (seconds, keys without prefix) and the emulated one (``emu_`` keys)."""
    out = {}
    for prefix, start, times, queued, scale in (("", arrival, token_times, scheduled, 1.0),
                                                ("emu_", emu_arrival, emu_token_times, emu_scheduled, 1e-9)):
        if queued is not None:
            out[prefix + "queue_s"] = (queued - start) * scale
        if not times:
            continue
        ttft = (times[0] - start) * scale
        latency = (times[-1] - start) * scale
        n = len(times)
        out[prefix + "ttft_s"] = ttft
        out[prefix + "latency_s"] = latency
        out[prefix + "tpot_s"] = (latency - ttft) / (n - 1) if n > 1 else 0.0
        out[prefix + "itl_s"] = out[prefix + "tpot_s"]  # the mean gap between tokens is the same quantity
    return out
