"""The host's share of a step: scheduling, input preparation, sampling, detokenisation, the API.

vLLM's own profiling of Llama 3 8B on one H100 (vLLM blog, "vLLM v0.6.0: 2.7x
Throughput Improvement and 5x Latency Reduction", 2024-09-05) found the GPU busy
only 38% of the time: the API server took 33% and scheduling with input
preparation 29%. Its answer was to overlap the host's work with the GPU's
(multi-step and asynchronous scheduling, the API server in its own process;
vLLM V1 keeps that design). A host spec gives the costs of that work on one
class of CPU; the engine charges them on the emulated clock (``--host-overhead on``):

* before a step: ``step_ns`` (schedule, build the batch) + ``seq_ns`` per
  scheduled sequence (block tables, positions, token ids) + ``request_ns`` per
  request seen for the first time (the API server: parse, tokenise, respond);
* after a step: ``sample_ns`` per sampled sequence, then ``detok_ns`` per token
  released to its request.

Serialised (``async_scheduling=False``, vLLM V0): a step starts after the
previous one's sampling, detokenisation and this step's preparation. Async
(vLLM V1 with async scheduling): the next step is prepared while the cards run
the current one, and detokenisation runs in the API server's process, so a step
waits only for the sampling of the step before and for whatever of its own
preparation did not fit under the previous step.

The figures are assumptions of this project, chosen to reproduce the order of
vLLM's split (above) for Llama 3 8B on an H100 at a few dozen sequences per
step with a Python scheduler on a server-class x86 core; they are not
measurements. ``rsd-launch calibrate`` fits them to measured points.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True, frozen=True)
class HostSpec:
    name: str
    cpu: str  # the class of CPU the figures assume
    step_ns: int  # per step: scheduling and building the batch
    seq_ns: int  # per scheduled sequence per step: its inputs
    request_ns: int  # per request, once: the API server's parse, tokenise and respond
    sample_ns: int  # per sampled sequence: logits to token
    detok_ns: int  # per released token: detokenisation, stop strings, streaming
    async_scheduling: bool = False
    source: str = ""

    def __post_init__(self):
        for f in ("step_ns", "seq_ns", "request_ns", "sample_ns", "detok_ns"):
            if getattr(self, f) < 0:
                raise ValueError(f"host {self.name}: {f} must be >= 0, got {getattr(self, f)}")

    def prepare_ns(self, num_seqs: int, new_requests: int) -> int:
        return self.step_ns + self.seq_ns * num_seqs + self.request_ns * new_requests

    def start(self, ready: int, prepare_ns: int, prev_start: int | None) -> int:
        """When a step can start: ``ready`` is when the previous step's sampling ended (or the
        arrival that woke an idle engine), ``prev_start`` when the previous step started."""
        if self.async_scheduling and prev_start is not None:
            return max(ready, prev_start + prepare_ns)
        return ready + prepare_ns

    def finish(self, end: int, num_sampled: int) -> tuple[int, int]:
        """(when the next step may start, when the step's tokens reach their requests)."""
        sampled = end + self.sample_ns * num_sampled
        out = sampled + self.detok_ns * num_sampled
        return (sampled if self.async_scheduling else out), out

    def to_dict(self) -> dict:
        return asdict(self)


_SRC = "assumed; order of vLLM's Llama 3 8B / H100 profile (vLLM blog, 2024-09-05)"
HOSTS: dict[str, HostSpec] = {
    # vLLM V0 style: one Python process schedules, prepares, samples and detokenises in turn
    "xeon-python": HostSpec("xeon-python", "server x86 core (Xeon / EPYC class), CPython", step_ns=1_000_000,
                            seq_ns=15_000, request_ns=2_000_000, sample_ns=20_000, detok_ns=10_000,
                            async_scheduling=False, source=_SRC),
    # vLLM V1 with async scheduling: the same work, overlapped with the cards
    "xeon-python-async": HostSpec("xeon-python-async", "server x86 core (Xeon / EPYC class), CPython",
                                  step_ns=1_000_000, seq_ns=15_000, request_ns=2_000_000, sample_ns=20_000,
                                  detok_ns=10_000, async_scheduling=True, source=_SRC),
}
HOST_OVERHEAD = ("off", "on")
DEFAULT_HOST = "xeon-python"


def get_host(value) -> HostSpec | None:
    """``off``/None: no host costs; ``on``: the default host; a preset name; or a HostSpec."""
    if isinstance(value, HostSpec) or value is None:
        return value
    if value in ("off", False):
        return None
    if value in ("on", True):
        return HOSTS[DEFAULT_HOST]
    try:
        return HOSTS[value]
    except (KeyError, TypeError):
        raise ValueError(f"host overhead must be off, on or a host preset ({', '.join(HOSTS)}), "
                         f"got {value!r}") from None
