"""What a serving benchmark sends and when: prompts (synthetic or from a JSONL file) and arrival times.

Plain functions with no HTTP in them, so that a live run and a replay on the emulated clock
draw the same workload from the same seed.

Arrivals follow vLLM's ``benchmark_serving``: gaps drawn from a gamma distribution with shape
``burstiness`` and mean ``1 / request_rate`` (burstiness 1 is a Poisson process; below 1 burstier,
above 1 more regular); an infinite rate sends everything at time 0.

A dataset file has one JSON object per line::

    {"prompt": "text" or [token ids], "output_len": 64, "arrival_s": 0.25}

``arrival_s`` (seconds from the start, optional) replays a trace: when every line has one, the
arrivals are those times, not drawn ones.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIRST_TOKEN_ID = 2  # synthetic prompts avoid ids 0 and 1, the tiny model's bos and eos


@dataclass(slots=True)
class PromptSpec:
    prompt: str | list[int]
    output_len: int
    arrival_s: float | None = None

    @property
    def prompt_len(self) -> int | None:
        """Tokens in the prompt when it is given as ids; None for text (the server counts those)."""
        return None if isinstance(self.prompt, str) else len(self.prompt)


def arrival_times(num: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times in seconds from the start, nondecreasing, the first one 0."""
    if num < 0:
        raise ValueError(f"the number of requests must be >= 0, got {num}")
    if not request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (inf: all at once), got {request_rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"--burstiness must be a finite number > 0, got {burstiness}")
    if math.isinf(request_rate) or num == 0:
        return [0.0] * num
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


def synthetic_prompts(num: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0) -> list[PromptSpec]:
    """``num`` prompts of ``input_len`` random token ids (the same for the same seed)."""
    if input_len < 1 or output_len < 1:
        raise ValueError(f"--input-len and --output-len must be >= 1, got {input_len} and {output_len}")
    if vocab_size <= FIRST_TOKEN_ID:
        raise ValueError(f"a vocabulary of {vocab_size} tokens is too small for synthetic prompts")
    rng = np.random.default_rng(seed)
    ids = rng.integers(FIRST_TOKEN_ID, vocab_size, size=(num, input_len))
    return [PromptSpec(row.tolist(), output_len) for row in ids]


def load_dataset(path: str | Path, num: int | None = None) -> list[PromptSpec]:
    """The first ``num`` lines (all if None) of a JSONL dataset; ValueError naming the line and field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such dataset file")
    specs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            specs.append(_parse_line(line, f"{path}:{lineno}"))
            if num is not None and len(specs) == num:
                break
    if not specs:
        raise ValueError(f"{path}: the dataset has no requests")
    timed = [s.arrival_s is not None for s in specs]
    if any(timed) and not all(timed):
        raise ValueError(f"{path}: arrival_s is given on some lines but not all ({sum(timed)} of {len(specs)})")
    if all(timed):
        specs.sort(key=lambda s: s.arrival_s)  # stable: lines with equal times keep their order
    return specs


def _parse_line(line: str, where: str) -> PromptSpec:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    ok = (isinstance(prompt, str) and prompt) or (
        isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                    for t in prompt))
    if not ok:
        raise ValueError(f"{where}: field 'prompt' must be a non-empty string or list of token ids >= 0, "
                         f"got {prompt!r:.60}")
    out = obj.get("output_len")
    if not isinstance(out, int) or isinstance(out, bool) or out < 1:
        raise ValueError(f"{where}: field 'output_len' must be an integer >= 1, got {out!r}")
    at = obj.get("arrival_s")
    if at is not None and (isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at)
                           or at < 0):
        raise ValueError(f"{where}: field 'arrival_s' must be a number of seconds >= 0, got {at!r}")
    return PromptSpec(prompt, out, None if at is None else float(at))


def schedule(specs: list[PromptSpec], request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times: the dataset's own when it has them, else drawn."""
    if specs and specs[0].arrival_s is not None:
        return [s.arrival_s for s in specs]  # load_dataset sorted them
    return arrival_times(len(specs), request_rate, burstiness, seed)
