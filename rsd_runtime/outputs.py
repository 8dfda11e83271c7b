"""What a finished request returns, with its timings on both clocks."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "prompt": self.prompt, "prompt_token_ids": self.prompt_token_ids,
                "token_ids": self.token_ids, "text": self.text, "finish_reason": self.finish_reason,
                **self.metrics}


def timing(m: dict, num_tokens: int) -> dict:
    """TTFT, TPOT = (latency - TTFT) / (tokens - 1), mean ITL, on the wall clock (s) and the emulated one."""
    out = {}
    for prefix, arrival, times, scale in (("", m["arrival"], m["token_times"], 1.0),
                                          ("emu_", m["emu_arrival"], m["emu_token_times"], 1e-9)):
        if not times:
            continue
        ttft = (times[0] - arrival) * scale
        latency = (times[-1] - arrival) * scale
        out[prefix + "ttft_s"] = ttft
        out[prefix + "latency_s"] = latency
        out[prefix + "tpot_s"] = (latency - ttft) / (num_tokens - 1) if num_tokens > 1 else 0.0
        gaps = [(b - a) * scale for a, b in zip(times, times[1:])]
        out[prefix + "itl_s"] = sum(gaps) / len(gaps) if gaps else 0.0
    return out
