"""Max-min fair rates by progressive filling, in exact rational arithmetic.

Every flow starts at rate 0 and all unfrozen flows rise together. A channel
is full when weight x (the sum of its flows' rates) reaches its capacity;
the flows crossing a full channel freeze at the rate they have, and a flow
also freezes at its own cap. The others rise on. The result is the unique
allocation in which no flow can go faster without slowing a flow that is no
faster than it.

Rates are `Fraction`s, so the result never depends on float rounding or on
the order flows are listed in.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from fractions import Fraction

Channel = Hashable
FlowKey = Hashable


def max_min_rates(paths: Mapping[FlowKey, Iterable[Channel]], capacity: Mapping[Channel, Fraction | int],
                  weight: Mapping[Channel, Fraction | int] | None = None,
                  caps: Mapping[FlowKey, Fraction | int] | None = None) -> dict[FlowKey, Fraction]:
    """Max-min fair rate of every flow.

    paths: per flow, the channels it crosses. capacity: per channel, in any
    unit; rates come out in it. weight: per channel, how much of each flow's
    rate counts against it (default 1; a channel its flows time-share, each
    busy there a fraction of the time, has a weight below 1). caps: optional
    per-flow ceilings.

        >>> max_min_rates({"a": ["x"], "b": ["x", "y"]}, {"x": 10, "y": 3})
        {'a': Fraction(7, 1), 'b': Fraction(3, 1)}
    """
    users: dict = {}
    for f, chans in paths.items():
        chans = set(chans)
        if not chans and (caps is None or f not in caps):
            raise ValueError(f"flow {f!r} crosses no channel and has no cap: its rate is unbounded")
        for c in chans:
            if c not in capacity:
                raise ValueError(f"flow {f!r} crosses channel {c!r}, which has no capacity")
            users.setdefault(c, []).append(f)
    remaining = {c: Fraction(capacity[c]) for c in users}
    share = {c: Fraction(1 if weight is None else weight.get(c, 1)) for c in users}
    for c in users:
        if remaining[c] <= 0 or share[c] <= 0:
            raise ValueError(f"channel {c!r}: capacity and weight must be positive, "
                             f"got {remaining[c]} and {share[c]}")
    ceiling = {f: Fraction(caps[f]) for f in paths if caps is not None and f in caps}
    chans_of: dict = {f: [] for f in paths}
    for c, fs in users.items():
        for f in fs:
            chans_of[f].append(c)
    rising = {c: len(fs) for c, fs in users.items()}  # unfrozen flows per channel
    rate: dict = {}
    level = Fraction(0)  # the rate every unfrozen flow has reached
    while len(rate) < len(paths):
        steps = [remaining[c] / (share[c] * n) for c, n in rising.items() if n]
        steps += [cap - level for f, cap in ceiling.items() if f not in rate]
        step = min(steps)
        level += step
        full = []
        for c, n in rising.items():
            if n:
                remaining[c] -= share[c] * n * step
                if remaining[c] == 0:
                    full.append(c)
        frozen = {f for c in full for f in users[c] if f not in rate}
        frozen.update(f for f, cap in ceiling.items() if cap == level and f not in rate)
        for f in frozen:
            rate[f] = level
            for c in chans_of[f]:
                rising[c] -= 1
    return {f: rate[f] for f in paths}
