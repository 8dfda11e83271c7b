"""Instances that share a fabric: the flows of one group's step, and the same step of every other.

Instances of a model run as tensor-parallel groups of cards (tenants) stepped
together: every instance runs the same command stream at the same time, so a
collective of one group is in flight while each other group of the same size
runs the same collective on its own cards. The flows of one step of group G
then run at the same emulated time as the image of those flows on every other
tenant H (card G[i] -> card H[i]), and all of them share the links they cross
by max-min fairness (``Topology.transfer_time_ns``). Two groups under one
switch uplink therefore slow each other down; groups whose traffic stays on
their own links (a box's fabric, their own switch) do not.

A step whose cards are not all in one tenant (a collective over cards of two
instances, a point-to-point transfer between them) runs with its own flows only.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

Flow = tuple[int, int]


def check(tenants: Iterable[Sequence[int]], num_cards: int) -> tuple[tuple[int, ...], ...]:
    """The tenants as tuples of card numbers, checked: in range, each card in one tenant at most."""
    out, seen = [], {}
    for i, group in enumerate(tenants):
        group = tuple(group)
        if not group:
            raise ValueError(f"tenant {i} has no cards")
        for card in group:
            if not isinstance(card, int) or isinstance(card, bool) or not 0 <= card < num_cards:
                raise ValueError(f"tenant {i}: card {card!r} out of range for {num_cards} cards")
            if card in seen:
                raise ValueError(f"card {card} is in tenants {seen[card]} and {i}: instances do not share cards")
            seen[card] = i
        out.append(group)
    return tuple(out)


def concurrent(tenants: tuple[tuple[int, ...], ...], flows: tuple[Flow, ...]) -> tuple[Flow, ...]:
    """``flows`` followed by their images on every other tenant of the same size."""
    if len(tenants) < 2 or not flows:
        return flows
    cards = {c for f in flows for c in f}
    own = next((t for t in tenants if cards <= set(t)), None)
    if own is None:
        return flows
    place = {c: i for i, c in enumerate(own)}
    out = list(flows)
    for other in tenants:
        if other is not own and len(other) == len(own):
            out += [(other[place[s]], other[place[d]]) for s, d in flows]
    return tuple(out)
