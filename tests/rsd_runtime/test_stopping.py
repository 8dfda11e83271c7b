"""Stop strings on held-back text: a stream never shows a stop string, or the start of one."""
from __future__ import annotations

import random

import pytest

from rsd_runtime.sampling import SamplingParams
from rsd_runtime.stopping import TextStop


def run(stops, pieces, include=False):
    ts = TextStop(SamplingParams(stop=stops, include_stop_str_in_output=include))
    shown = []
    for p in pieces:
        shown.append(ts.feed(p))
        if ts.hit:
            break
    if not ts.hit:
        shown.append(ts.flush())
    return shown, ts


def test_a_stop_string_split_over_pieces_is_never_shown():
    shown, ts = run(["\n\n"], ["Hello", "\n", "\nBye"])
    assert shown == ["Hello", "", ""] and ts.hit


def test_held_text_is_released_when_no_stop_can_form():
    shown, ts = run(["STOP"], ["ab", "S", "x", "yz"])
    assert shown == ["ab", "", "Sx", "yz", ""] and not ts.hit  # "S" is held until "x" rules out "STOP"


def test_include_stop_string_and_earliest_match():
    shown, _ = run(["b", "cd"], ["a", "cdb"], include=True)
    assert "".join(shown) == "acd"
    shown, _ = run(["cd", "b"], ["a", "bcd"])
    assert "".join(shown) == "a"


def test_no_stop_strings_releases_everything_at_once():
    shown, _ = run(None, ["ab", "cd"])
    assert shown == ["ab", "cd", ""]


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_show_exactly_the_text_before_the_first_stop(seed):
    rng = random.Random(seed)
    alphabet = "ab\n "
    text = "".join(rng.choice(alphabet) for _ in range(60))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(2)]
    cuts = sorted(rng.sample(range(1, len(text)), 10))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    shown, ts = run(stops, pieces)
    first = min((i for s in stops if (i := text.find(s)) >= 0), default=None)
    want = text if first is None else text[:first]
    assert "".join(shown) == want and ts.hit == (first is not None)
    released = ""
    for part in shown:  # at no moment does the shown text hold a stop string
        released += part
        assert not any(s in released for s in stops)
