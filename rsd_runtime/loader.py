"""Streaming a checkpoint's shards into the cards' weight arenas."""
from __future__ import annotations

import sys

from tqdm import tqdm

from rsd_runtime.compiler import CardProgram


def load_weights(cluster, ckpt, programs: list[CardProgram], *, progress: bool = True, prefix: str = "",
                 tier: str | None = None) -> int:
    """Put every card's shards into its arena (in flight to all cards at once); returns the bytes placed.
    ``tier``: into that staging tier instead, each name after ``prefix`` (an expert of a pool)."""
    by_source: dict[str, list[tuple[int, object]]] = {}
    for prog in programs:
        for shard in prog.shards:
            by_source.setdefault(shard.source, []).append((prog.card, shard))
    total = 0
    with tqdm(total=len(by_source), desc="placing shards", unit="tensor", file=sys.stderr, leave=False,
              disable=not (progress and sys.stderr.isatty())) as bar:
        for source, uses in by_source.items():
            tensor = ckpt.get(source)
            futs = []
            for card, shard in uses:
                part = shard.extract(tensor)
                total += part.numel() * part.element_size()
                futs.append(cluster.put_async(card, prefix + shard.name, part, tier))
            for f in futs:
                f.result(120)
            bar.update(1)
    return total


def place_phantom(cluster, cfg, programs: list[CardProgram], dtype: str, *, prefix: str = "",
                  tier: str | None = None) -> None:
    """Phantom cards: account for every shard at its nominal size; no bytes move."""
    shapes = cfg.tensor_shapes()
    where = {"tier": tier} if tier else {}
    futs = [cluster.control.submit(prog.card, "put", {"name": prefix + s.name, "dtype": dtype,
                                                      "shape": list(s.shape(shapes[s.source])), **where})
            for prog in programs for s in prog.shards]
    for f in futs:
        f.result(120)
