"""Putting a model on cards: compile, place the shards, install the command streams and KV caches.

Shared by the engine (one instance, real or phantom) and the performance
runner (several instances of phantom cards).
"""
from __future__ import annotations

import logging

from devices.kv_cache import KVLayout
from rsd_runtime.compiler import CardProgram, compile_model, kv_heads_of
from rsd_runtime.loader import load_weights, place_phantom
from devices.memory import OutOfDeviceMemory, fmt_bytes
from interconnect import wire
from rsd_runtime.model_config import ModelConfig
from rsd_runtime.phases import phase

log = logging.getLogger("rsd.deploy")


def deploy(cluster, cfg: ModelConfig, tp: int, cards: list[int], *, ckpt=None, dtype: str, weight_dtype: str,
           num_kv_blocks: int, block_size: int, progress: bool = False, fusion: str = "none",
           expert: str | None = None, tier: str | None = None) -> list[CardProgram]:
    """``expert``: one model of a pool (``rsd_runtime.coe_engine``): its shards go to the staging ``tier``
    under ``<expert>/`` and its command stream is installed when it is activated, not now."""
    with phase(log, f"compile for tp={tp}"):
        programs = compile_model(cfg, tp, cards, fusion=fusion)
    check_fits(cfg, tp, cluster.spec, weight_dtype, dtype, num_kv_blocks, block_size, cards[0])
    where = {"prefix": f"{expert}/", "tier": tier} if expert is not None else {}
    with phase(log, "place the weight shards" if ckpt is not None else "place phantom shards (no bytes)"):
        if ckpt is not None:
            load_weights(cluster, ckpt, programs, progress=progress, **where)
        else:
            place_phantom(cluster, cfg, programs, weight_dtype, **where)
    if expert is not None:
        return programs
    with phase(log, "install command streams and KV caches" + (" (each card imports torch)" if ckpt else "")):
        load_programs(cluster, programs, cfg, dtype=dtype, weight_dtype=weight_dtype, num_kv_blocks=num_kv_blocks,
                      block_size=block_size)
    return programs


def load_programs(cluster, programs: list[CardProgram], cfg: ModelConfig, *, dtype: str, weight_dtype: str,
                  num_kv_blocks: int, block_size: int, cards: list[int] | None = None, attach: bool = False,
                  weight_prefix: str = "") -> None:
    """Install each card's command stream and its KV cache; ``attach``: keep the cache the card holds
    if its layout is the same (a restarted card's, or the last expert's). ``weight_prefix``: the
    stream reads the arena's tensors under this prefix (one expert of several resident)."""
    futs = []
    for prog in programs:
        if cards is not None and prog.card not in cards:
            continue
        meta = {**prog.meta, "compute_dtype": dtype, "weight_dtype": weight_dtype, "weight_prefix": weight_prefix}
        kv = {"num_layers": cfg.num_layers, "num_blocks": num_kv_blocks, "block_size": block_size,
              "num_kv_heads": prog.meta["num_kv_heads"], "head_dim": cfg.head_dim, "dtype": dtype}
        futs.append(cluster.control.submit(prog.card, "load_program",
                                           {"program": {"ops": prog.ops, "meta": meta}, "kv": kv, "attach": attach}))
    for f in futs:
        f.result(300)


def kv_block_bytes(cfg: ModelConfig, tp: int, block_size: int, dtype: str) -> int:
    """Bytes one KV block costs on one card (all layers, keys and values)."""
    return KVLayout(cfg.num_layers, 1, block_size, kv_heads_of(cfg, tp)[0], cfg.head_dim, dtype).block_bytes


def shard_bytes(cfg: ModelConfig, tp: int, dtype_size: int) -> int:
    """Weight bytes on the busiest card of one instance."""
    shapes = cfg.tensor_shapes()
    worst = 0
    for prog in compile_model(cfg, tp):
        total = 0
        for s in prog.shards:
            n = 1
            for d in s.shape(shapes[s.source]):
                n *= d
            total += n * dtype_size
        worst = max(worst, total)
    return worst


def check_fits(cfg: ModelConfig, tp: int, spec, weight_dtype: str, dtype: str, num_kv_blocks: int,
               block_size: int, card: int) -> None:
    """Refuse, before anything is placed, a model or KV cache larger than a card's memory."""
    weights = shard_bytes(cfg, tp, wire.itemsize(weight_dtype))
    kv = num_kv_blocks * kv_block_bytes(cfg, tp, block_size, dtype)
    cap = spec.memory_bytes
    if weights > cap:
        raise OutOfDeviceMemory(
            f"card {card}: the weights of this model at tp={tp} need {fmt_bytes(weights)} per card; "
            f"{spec.name} has {fmt_bytes(cap)} (missing {fmt_bytes(weights - cap)}); use a larger tp")
    if weights + kv > cap:
        raise OutOfDeviceMemory(
            f"card {card}: {num_kv_blocks} KV blocks need {fmt_bytes(kv)} beside {fmt_bytes(weights)} of weights; "
            f"{spec.name} has {fmt_bytes(cap)} (missing {fmt_bytes(weights + kv - cap)})")


def max_kv_blocks(cfg: ModelConfig, tp: int, spec, weight_dtype: str, dtype: str, block_size: int,
                  utilization: float = 0.9) -> int:
    """KV blocks that fit beside the weights in ``utilization`` of a card's memory (vLLM's
    gpu_memory_utilization); the rest is headroom for activations."""
    free = int(spec.memory_bytes * utilization) - shard_bytes(cfg, tp, wire.itemsize(weight_dtype))
    return max(0, free // kv_block_bytes(cfg, tp, block_size, dtype))
