"""Emulated performance of a model on phantom cards: instances, steps, and what a batch costs.

``PerfRunner`` puts ``instances`` independent tensor-parallel copies of a model
on ``tp x instances`` phantom cards and runs synthetic steps on all of them at
once; a step's emulated time is the slowest instance's. ``batch_timing`` turns
steps into TTFT, TPOT and throughput for a static batch:

* all B prompts arrive at clock 0 and are prefilled in steps of at most
  ``chunk`` tokens (chunked prefill, packed in arrival order); a sequence's
  first token is out when its last prefill chunk ends;
* then the B sequences decode together, one token each per step, until each
  has ``output_len`` tokens.

Two exact shortcuts keep this fast: a step whose shape (tokens and positions
of every sequence) was run before is not run again, since emulated times
repeat exactly; and decode steps are run at ``decode_samples`` context lengths
and interpolated linearly in between, the cost of a decode step being linear
in the context length for a fixed batch except where attention changes from
memory- to compute-bound (``decode_samples=0`` runs every step).
"""
from __future__ import annotations

from dataclasses import dataclass

from devices.memory import OutOfDeviceMemory, fmt_bytes
from devices.spec import DeviceSpec, get_spec
from devices.step import SeqSlice, StepPlan
from interconnect.topology import topology_for
from rsd_runtime.cluster import Cluster
from rsd_runtime.compiler import check_tp
from rsd_runtime.deploy import kv_block_bytes
from rsd_runtime.engine import LLMEngine, resolve_model


class PerfRunner:
    """``instances`` engines on ``tp x instances`` phantom cards, stepped together.

    ``backend="sim"`` (default) runs the instances in this process on the emulated clock;
    ``"cards"`` on phantom card processes of one cluster. Both give the same figures.
    """

    def __init__(self, model: str, *, tp: int, instances: int = 1, device: str = "atom-plus",
                 dtype: str | None = None, block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_utilization: float = 0.9, backend: str = "sim", topology: str = "switch",
                 link: str | None = None, topology_options: dict | None = None,
                 placement: list[list[int]] | None = None, fusion: str = "none", overlap="off",
                 host_overhead="off", **cluster_kwargs):
        _, cfg, _ = resolve_model(model, phantom=True)
        check_tp(cfg, tp)
        from rsd_runtime.host_spec import get_host

        self.cfg, self.tp, self.instances = cfg, tp, instances
        self.host = get_host(host_overhead)
        self.spec = device if isinstance(device, DeviceSpec) else get_spec(device)
        groups = placement_of(tp, instances, placement)
        n = max(c for g in groups for c in g) + 1
        kw = dict(dtype=dtype, block_size=block_size, num_kv_blocks=num_kv_blocks, kv_utilization=kv_utilization,
                  progress=False, phantom=True, fusion=fusion, overlap=overlap)
        self.cluster = None
        # a fixed-size topology keeps all its cards, the ones no instance takes idle; the instances
        # share the fabric, stepped together (interconnect.topo_tenants)
        self.placement = groups
        tenants = groups if instances > 1 else ()
        topo = topology_for(topology, n, link, tenants=tenants, **(topology_options or {}))
        if backend == "sim":
            self.engines = [LLMEngine(model, tp, device=self.spec, cards=g, backend="sim", topology=topo, **kw)
                            for g in groups]
        elif backend == "cards":
            self.cluster = Cluster(num_devices=topo.num_cards, device=self.spec, phantom=True, topology=topology,
                                   link=link, topology_options=topology_options, tenants=tenants,
                                   **cluster_kwargs).start()
            try:
                self.engines = [LLMEngine(model, tp, cluster=self.cluster, cards=g, **kw) for g in groups]
            except BaseException:
                self.cluster.shutdown()
                raise
        else:
            raise ValueError(f"unknown backend {backend!r}; known: sim, cards")
        first = self.engines[0]
        self.dtype, self.block_size, self.num_kv_blocks = first.dtype, block_size, first.num_kv_blocks
        self.emu_now = 0
        self.trace = None
        self._cache: dict[tuple, int] = {}
        self.steps_run = 0

    @property
    def num_cards(self) -> int:
        return self.tp * self.instances

    def kv_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    def step(self, seqs: list[tuple[int, int]]) -> int:
        """Emulated ns of one step feeding (tokens, first position) per sequence; each samples.

        Every instance runs the step at once; the step's time is the slowest instance's.
        """
        key = tuple(seqs)
        if key in self._cache:
            return self._cache[key]
        layout, rows, row = [], [], 0
        for n, p0 in seqs:
            layout.append(SeqSlice(row, n, p0, []))
            rows.append(row + n - 1)
            row += n
        plan = StepPlan(self.emu_now, layout, rows)
        if self.engines[0].pipeliner is not None:  # the instances are alike: one choice for all
            plan = self.engines[0].pipeliner.apply(plan)
        if self.cluster is None:
            end = max(e.runner.run(plan)[1] for e in self.engines)
        else:
            blob = plan.pack()
            futs = [e.runner.submit(plan, blob) for e in self.engines]
            end = max(e.runner.collect(plan, f)[1] for e, f in zip(self.engines, futs))
        if self.trace is not None:  # instance 0; the host's work is charged by batch_timing, not drawn
            self.engines[0].draw(plan, end, end, len(seqs), 0)
        self._cache[key] = took = end - self.emu_now
        self.emu_now = end
        self.steps_run += 1
        return took

    def start_trace(self, trace) -> None:
        """Draw instance 0's steps from now on (``rsd_runtime.trace``); repeated shapes are not rerun."""
        self.trace = trace
        self.engines[0].start_trace(trace)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()

    def __enter__(self) -> "PerfRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def placement_of(tp: int, instances: int, placement: list[list[int]] | None) -> list[list[int]]:
    """The cards of each instance: ``placement`` checked, or consecutive cards (instance i on cards
    i*tp .. i*tp + tp - 1: box by box on the study presets, so tp=8 takes one box)."""
    if placement is None:
        return [list(range(i * tp, (i + 1) * tp)) for i in range(instances)]
    groups = [list(g) for g in placement]
    if len(groups) != instances:
        raise ValueError(f"placement names {len(groups)} instances, not {instances}")
    seen: set[int] = set()
    for i, g in enumerate(groups):
        if len(g) != tp:
            raise ValueError(f"placement: instance {i} has {len(g)} cards, not tp={tp}")
        if any(not isinstance(c, int) or c < 0 for c in g):
            raise ValueError(f"placement: instance {i}: cards are numbers >= 0, got {g}")
        if seen & set(g) or len(set(g)) != tp:
            raise ValueError(f"placement: instance {i} takes a card twice or one another instance has: {g}")
        seen |= set(g)
    return groups


@dataclass(slots=True)
class BatchTiming:
    batch: int
    ttft_ns: float  # mean over the batch
    tpot_ns: float  # decode time / (output_len - 1)
    total_ns: int  # first prompt in to last token out
    output_tokens: int  # per instance

    def tps(self, instances: int) -> float:
        return instances * self.output_tokens / (self.total_ns * 1e-9)


def batch_timing(runner: PerfRunner, batch: int, input_len: int, output_len: int, *, chunk: int = 2048,
                 decode_samples: int = 5) -> BatchTiming:
    need = -(-(input_len + output_len) // runner.block_size) * batch
    if need > runner.num_kv_blocks:
        per_block = kv_block_bytes(runner.cfg, runner.tp, runner.block_size, runner.dtype)
        raise OutOfDeviceMemory(
            f"card 0: a batch of {batch} x {input_len + output_len} tokens needs {need} KV blocks "
            f"({fmt_bytes(need * per_block)}); the card has room for {runner.num_kv_blocks} "
            f"(missing {fmt_bytes((need - runner.num_kv_blocks) * per_block)})")
    steps = []  # (device ns, sequences, new requests, sampled sequences) of every step
    for step in _prefill_steps(batch, input_len, chunk):
        done = sum(1 for s, n, p0 in step if p0 + n == input_len)
        steps.append((runner.step([(n, p0) for _, n, p0 in step]), len(step), sum(p0 == 0 for _, _, p0 in step),
                      done))
    num_prefill = len(steps)
    steps += [(ns, batch, 0, batch) for ns in _decode_times(runner, batch, input_len, output_len, decode_samples)]
    ends = _timeline(runner.host, steps)
    first_token = []
    for step, (_, out) in zip(_prefill_steps(batch, input_len, chunk), ends):
        first_token += [out for s, n, p0 in step if p0 + n == input_len]
    total = ends[-1][1]
    decode = total - ends[num_prefill - 1][1]
    return BatchTiming(batch, sum(first_token) / batch, decode / max(output_len - 1, 1), total, batch * output_len)


def _timeline(host, steps) -> list[tuple[float, float]]:
    """(end on the cards, when its tokens are out) of each step, the host's work charged as the engine
    charges it (``HostSpec.start`` / ``finish``); without a host the two are the cards' clock."""
    ready, prev, out = 0.0, None, []
    for ns, seqs, new, sampled in steps:
        start = ready if host is None else host.start(ready, host.prepare_ns(seqs, new), prev)
        end = start + ns
        ready, done = (end, end) if host is None else host.finish(end, sampled)
        prev = start
        out.append((end, done))
    return out


def _prefill_steps(batch: int, input_len: int, chunk: int):
    """Pack the B prompts, in order, into steps of at most ``chunk`` tokens: [(seq, tokens, first position)]."""
    steps, cur, room = [], [], chunk
    for s in range(batch):
        p0 = 0
        while p0 < input_len:
            n = min(input_len - p0, room)
            cur.append((s, n, p0))
            p0 += n
            room -= n
            if room == 0:
                steps.append(cur)
                cur, room = [], chunk
    if cur:
        steps.append(cur)
    return steps


def _decode_times(runner: PerfRunner, batch: int, input_len: int, output_len: int, samples: int) -> list[float]:
    """Device ns of the decode steps k = 0 .. output_len-2 (token k+1 written at position input_len + k)."""
    n = output_len - 1
    if n <= 0:
        return []
    if samples <= 0 or samples >= n:
        return [runner.step([(1, input_len + k)] * batch) for k in range(n)]
    points = sorted({round(i * (n - 1) / (samples - 1)) for i in range(samples)})
    times = {k: runner.step([(1, input_len + k)] * batch) for k in points}
    out = []
    for a, b in zip(points, points[1:]):  # linear between samples, exact where the cost is linear
        out += [times[a] + (times[b] - times[a]) * (k - a) / (b - a) for k in range(a, b)]
    return out + [times[points[-1]]]
