"""Many models on one instance's cards: a Composition of Experts served by one engine.

    engine = CoEEngine({"a": "path/a", "b": "path/b"}, tp=2, router="router.toml")
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=8), model="b")   # or model="coe": routed

Every expert's shards are staged in the cards' DDR tier (or host memory) when
the engine starts; one expert runs at a time. Requests queue in arrival order;
the active expert takes the requests at the head of the queue that name it, and
when the head names another expert, the active one finishes what it runs, then
the pool (``rsd_runtime.coe.ExpertPool``) makes the head's expert active: the
least recently used idle experts leave device memory if it is full, the
expert's shards are copied in (real bytes on real cards) and its command
stream is installed. The switch costs the emulated time of the copy over the
tier path, charged on the instance's clock, so a request that waits for it has
it in its TTFT (on both clocks).

Each expert keeps its own host-side engine (``LLMEngine(expert=...)``:
scheduler, KV blocks, sampling), all of them on the same cards; the cards' KV
cache is the active expert's. A router (``rsd_runtime.coe_router``) chooses the
expert of a request sent to the router's name; a classifier router runs on a
card of its own beside the experts' cards.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from devices.arena import ALIGN
from devices.spec import DeviceSpec, get_spec
from interconnect import wire
from rsd_runtime.coe import ExpertPool, Switch
from rsd_runtime.coe_router import RouterConfig
from rsd_runtime.deploy import kv_block_bytes, shard_bytes
from rsd_runtime.engine import EngineStats, LLMEngine, resolve_model
from rsd_runtime.errors import EngineDeadError
from rsd_runtime.outputs import RequestOutput
from rsd_runtime.sampling import SamplingParams
from rsd_runtime.scheduler import MAX_NUM_SEQS

log = logging.getLogger("rsd.coe")


class UnknownModel(ValueError):
    """A request names a model the engine does not serve."""


@dataclass(slots=True)
class Pending:
    model: str
    prompt: object
    params: SamplingParams
    arrival_time: float | None
    emu_arrival: int
    ready_ns: int  # when the router has decided (emu_arrival plus the classifier's step)


def expert_pool(spec: DeviceSpec, models: dict[str, str], cfgs: dict, tp: int, num_kv_blocks: int, block_size: int,
                dtype: str | None, staging: str | None, topology: str | None) -> ExpertPool:
    """The pool of these experts on ``tp`` cards: each one's weight bytes on the busiest card; device memory
    for experts is what the largest KV cache and the arena's alignment of every tensor leave."""
    kv = max(num_kv_blocks * kv_block_bytes(c, tp, block_size, dtype or c.dtype) for c in cfgs.values())
    slack = max(ALIGN * len(c.tensor_shapes()) for c in cfgs.values())
    sizes = {p: shard_bytes(cfgs[n], tp, wire.itemsize(cfgs[n].dtype)) for n, p in models.items()}  # per model
    return ExpertPool(spec, {n: sizes[p] for n, p in models.items()}, source=staging, reserved_bytes=kv + slack,
                      num_cards=tp, topology=topology or "switch")


class CoEEngine:
    def __init__(self, models: dict[str, str], tp: int = 1, *, device: str | DeviceSpec = "atom-plus",
                 staging: str | None = None, router: str | RouterConfig | None = None, phantom: bool = False,
                 backend: str = "cards", topology: str | None = None, block_size: int = 16,
                 num_kv_blocks: int | None = None, max_num_seqs: int = MAX_NUM_SEQS, progress: bool = True,
                 shm_prefix: str | None = None, **engine_kwargs):
        if not models:
            raise ValueError("models: give at least one expert (name -> checkpoint or preset)")
        bad = [n for n in models if not n or "/" in n]
        if bad:
            raise ValueError(f"models: expert names must be non-empty and without '/': {bad}")
        self.spec = device if isinstance(device, DeviceSpec) else get_spec(device)
        self.router = RouterConfig.from_toml(router) if isinstance(router, str) else router
        # every check that needs only the configs runs before any card starts
        read = {p: resolve_model(p, phantom, False)[1] for p in set(models.values())}
        cfgs = {n: read[p] for n, p in models.items()}
        if self.router is not None:
            if self.router.classifier is not None and phantom:
                raise ValueError("a classifier router needs real cards: phantom cards compute no logits")
            vocab = {n: c.vocab_size for n, c in cfgs.items()}
            if self.router.classifier is not None:
                clf = self.router.classifier.model
                vocab[f"classifier {clf}"] = resolve_model(clf, False, False)[1].vocab_size
            self.router.check(vocab)
        blocks = num_kv_blocks or max(-(-max_num_seqs * min(c.max_position_embeddings, 1024) // block_size)
                                      for c in cfgs.values())
        self.pool = expert_pool(self.spec, models, cfgs, tp, blocks, block_size, engine_kwargs.get("dtype"),
                                staging, topology)
        self.tp, self.phantom, self.backend = tp, phantom, backend
        self.cards = list(range(tp))
        self.cluster = None
        self.engines: dict[str, LLMEngine] = {}
        self.classifier: LLMEngine | None = None
        kw = dict(device=self.spec, phantom=phantom, block_size=block_size, num_kv_blocks=blocks,
                  max_num_seqs=max_num_seqs, progress=progress, **engine_kwargs)
        try:
            if backend == "sim":
                for name, path in models.items():
                    self.engines[name] = LLMEngine(path, tp, backend="sim", topology=topology, expert=name, **kw)
            elif backend == "cards":
                self._start_cards(models, kw, topology, shm_prefix, progress)
            else:
                raise ValueError(f"unknown backend {backend!r}; known: cards, sim")
        except BaseException:
            self.close()
            raise
        first = next(iter(self.engines.values()))
        self.cfg, self.tokenizer, self.max_model_len = first.cfg, self._shared_tokenizer(), first.max_model_len
        self.model = ",".join(models)
        self.active: str | None = None
        self.queue: deque = deque()  # request ids not yet given to their expert, in arrival order
        self.pending: dict = {}  # request id -> Pending
        self.requests: dict = {}  # live request id -> expert
        self.switches: list[Switch] = []
        self.emu_now = 0
        self.aborted_queued = 0  # aborted before reaching their expert

    def _start_cards(self, models, kw, topology, shm_prefix, progress) -> None:
        from rsd_runtime.cluster import Cluster, start_with_bar

        extra = 1 if self.router is not None and self.router.classifier is not None else 0
        opts = {"shm_prefix": shm_prefix} if shm_prefix else {}
        if topology:
            opts["topology"] = topology
        self.cluster = start_with_bar(Cluster(num_devices=self.tp + extra, device=self.spec,
                                              phantom=self.phantom, **opts), progress)
        for name, path in models.items():
            self.engines[name] = LLMEngine(path, self.tp, cluster=self.cluster, cards=self.cards, expert=name,
                                           staging=self.pool.path.source, **kw)
        if extra:
            self.classifier = LLMEngine(self.router.classifier.model, 1, cluster=self.cluster, cards=[self.tp],
                                        device=self.spec, num_kv_blocks=kw["num_kv_blocks"], progress=progress)

    def _shared_tokenizer(self):
        """The experts' tokenizer if they share one (text prompts), else None (token ids only)."""
        toks = [e.tokenizer for e in self.engines.values()]
        if any(t is None for t in toks) or len({t.tok.to_str() for t in toks}) > 1:
            return None
        return toks[0]

    # -- requests --------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self.engines) + ([self.router.name] if self.router is not None else [])

    def expert_of(self, model: str | None) -> str | None:
        """The expert a model name serves (None: the router's choice); UnknownModel if none."""
        if model is None and len(self.engines) == 1:
            return next(iter(self.engines))
        if model in self.engines:
            return model
        if (model is None or model == getattr(self.router, "name", None)) and self.router is not None:
            return None
        raise UnknownModel(f"model: the model {model!r} does not exist; this server serves "
                           f"{', '.join(map(repr, self.model_names))}")

    def validate(self, prompt, params: SamplingParams | None, model: str | None = None) -> list[int]:
        expert = self.expert_of(model)
        engine = self.engines[expert] if expert is not None else next(iter(self.engines.values()))
        return engine.validate(prompt, params)

    def route(self, prompt, ids: list[int], at_ns: int) -> tuple[str, int]:
        """(expert, emulated ns the router took) for a prompt sent to the router's name."""
        r = self.router
        expert = r.by_rules(prompt if isinstance(prompt, str) else None, ids)
        if expert is not None or r.classifier is None:
            return expert or r.default, 0
        clf = self.classifier
        clf.emu_now = max(clf.emu_now, at_ns)
        logits = clf.prefill_logits(ids)
        return r.classifier.choose(logits[-1]), clf.emu_now - at_ns

    def add_request(self, request_id, prompt, params: SamplingParams | None = None, *, model: str | None = None,
                    arrival_time: float | None = None, emu_arrival: int | None = None) -> None:
        """Queue a request for ``model`` (an expert, or the router's name); raises, queueing nothing, if the
        model is unknown or the request invalid."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine is down ({self.dead}); call recover() first")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        ids = self.validate(prompt, params, model)
        if emu_arrival is not None and not self.requests:
            self.emu_now = max(self.emu_now, emu_arrival)
        arrival = self.emu_now if emu_arrival is None else emu_arrival
        expert, route_ns = self.expert_of(model), 0
        if expert is None:
            expert, route_ns = self.route(prompt, ids, arrival)
        self.pending[request_id] = Pending(expert, prompt, params, arrival_time, arrival, arrival + route_ns)
        self.queue.append(request_id)
        self.requests[request_id] = expert

    def abort_request(self, request_id) -> bool:
        expert = self.requests.pop(request_id, None)
        if expert is None:
            return False
        if self.pending.pop(request_id, None) is not None:
            self.queue.remove(request_id)
            self.aborted_queued += 1
            return True
        return self.engines[expert].abort_request(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def num_waiting(self) -> int:
        return len(self.queue) + sum(e.num_waiting() for e in self.engines.values())

    # -- one step: admit, switch if the head of the queue needs it, step the active expert --------
    def step(self, on_sent=None) -> list[RequestOutput]:
        """``on_sent``: as in ``LLMEngine.step``."""
        engine = self.engines.get(self.active)
        if engine is None or not engine.has_unfinished():
            if not self.queue:
                return []
            head = self.pending[self.queue[0]]
            self.emu_now = max(self.emu_now, head.ready_ns)  # idle: wait for the router's answer
            if head.model != self.active:
                self._switch(head.model)
            engine = self.engines[self.active]
        self._admit(engine)
        engine.emu_now = max(engine.emu_now, self.emu_now)
        outs = engine.step(on_sent)
        self.emu_now = engine.emu_now
        for out in outs:
            if out.finished:
                self.requests.pop(out.request_id, None)
        return outs

    def _admit(self, engine: LLMEngine) -> None:
        """Give the active expert the requests at the head of the queue that name it and have arrived."""
        while self.queue:
            p = self.pending[self.queue[0]]
            if p.model != self.active or p.ready_ns > self.emu_now:
                return
            rid = self.queue.popleft()
            del self.pending[rid]
            engine.add_request(rid, p.prompt, p.params, arrival_time=p.arrival_time, emu_arrival=p.emu_arrival)

    def _switch(self, expert: str) -> None:
        sw = self.pool.activate(expert)
        if self.cluster is not None:
            futs = [self.cluster.control.submit(c, "activate", {"expert": expert, "tier": self.pool.path.source,
                                                                "evict": list(sw.evicted)}) for c in self.cards]
            for f in futs:
                f.result(300)
            self.engines[expert].load_program()
        log.info("switch to %s: %s, %d ns", expert, "resident" if sw.hit else f"{sw.nbytes} B copied", sw.ns)
        self.emu_now += sw.ns
        self.active = expert
        self.switches.append(sw)

    # -- state, failures, shutdown ----------------------------------------------------------
    @property
    def dead(self):
        return next((e.dead for e in self.engines.values() if e.dead is not None), None)

    @dead.setter
    def dead(self, exc) -> None:
        if self.active is not None:
            self.engines[self.active].dead = exc

    @property
    def stats(self) -> EngineStats:
        """The experts' counters summed."""
        out = EngineStats()
        for e in self.engines.values():
            for k, v in vars(e.stats).items():
                setattr(out, k, getattr(out, k) + v)
        out.aborted += self.aborted_queued
        return out

    @property
    def max_len(self) -> int:
        return min(e.max_len for e in self.engines.values())

    def num_running(self) -> int:
        return sum(e.num_running() for e in self.engines.values())

    def kv_usage(self) -> float:
        return self.engines[self.active].kv_usage() if self.active is not None else 0.0

    def switch_stats(self) -> dict:
        """Switches (copies), hits, and emulated time spent copying, over the engine's life."""
        copies = [s for s in self.switches if not s.hit]
        return {"switches": len(copies), "hits": len(self.switches) - len(copies),
                "emu_switch_s": sum(s.ns for s in copies) * 1e-9}

    def fail_all(self, error: str) -> list[RequestOutput]:
        outs = [o for e in self.engines.values() for o in e.fail_all(error)]
        for rid in list(self.pending):
            self.abort_request(rid)
        self.requests.clear()
        return outs

    def recover(self) -> list[RequestOutput]:
        """Restart dead cards; the active expert's shards and command stream go back on them."""
        failed = self.fail_all("the cards failed")
        for card in [c for c in self.cards if c in self.cluster.control.dead]:
            self.cluster.restart(card)
        for e in self.engines.values():
            e.dead = None
            e.runner.resync()
        if self.active is not None:
            self.engines[self.active].load_program()
        return failed

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
