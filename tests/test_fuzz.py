"""Hostile input from peers that hold the run secret: fabric frames, control messages and step plans
built from random bytes and random field values. No card or host thread dies, nothing leaks, and the
next generate gives the reference tokens."""
from __future__ import annotations

import time

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import assert_no_leaks, wait_until
from interconnect import auth, wire
from rsd_runtime.llm import LLM
from rsd_runtime.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
PROMPT = "The weather today is"
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=8), st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                      max_leaves=12)


@pytest.fixture(scope="module")
def llm(shm_prefix):
    with LLM(tensor_parallel_size=2, shm_prefix=shm_prefix, progress=False) as llm:
        yield llm
    assert_no_leaks()


@pytest.fixture(scope="module")
def reference(llm):
    return llm.generate([PROMPT], GREEDY)[0].token_ids


def _socket(kind: int, endpoint: str, secret: str, identity: bytes | None = None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    auth.make_client(sock, secret)
    sock.connect(endpoint)
    return sock


def _alive(llm) -> None:
    cluster = llm.engine.cluster
    assert cluster.control._thread.is_alive()
    cluster.check()
    assert all(p.poll() is None for p in cluster.procs.values())


# -- fabric frames -------------------------------------------------------------------------------------
# Forged headers may name real cards, but never a tag of the current epoch or a live window token:
# a forger with the secret that guesses those can feed a collective wrong data, which no check of a
# header alone can tell from right data.
fabric_headers = st.fixed_dictionaries({
    "op": st.sampled_from(["p2p", "ack", "meta", "hello", ""]),
}, optional={
    "src": st.one_of(st.integers(-3, 5), st.text(max_size=3), st.none(), st.lists(st.integers(-2 ** 63, 2 ** 64 - 1), max_size=2)),
    "tag": st.one_of(st.lists(st.integers(-5, -1), min_size=1, max_size=4),
                     st.lists(st.integers(10 ** 9, 10 ** 12), min_size=1, max_size=4), values),
    "nbytes": st.one_of(st.integers(-10, 1 << 40), values),
    "shm": st.one_of(st.lists(st.integers(-(1 << 40), 1 << 40), min_size=2, max_size=3), values),
    "token": st.one_of(st.integers(10 ** 9, 2 ** 63), values),
    "start": st.integers(0, 2 ** 63), "occ": st.integers(-5, 2 ** 40), "lat": st.integers(-5, 2 ** 40),
    "meta": values, "sent": values,
})


@FUZZ
@given(frames=st.lists(st.one_of(st.binary(max_size=48).map(lambda b: [b]),
                                 fabric_headers.map(lambda h: [msgpack.packb(h, use_bin_type=True)]),
                                 st.tuples(fabric_headers, st.binary(max_size=64)).map(
                                     lambda hp: [msgpack.packb(hp[0], use_bin_type=True), hp[1]])),
                       min_size=1, max_size=6),
       card=st.sampled_from([0, 1]))
def test_fabric_frames_from_random_bytes_and_fields(llm, reference, frames, card):
    cluster = llm.engine.cluster
    sock = _socket(zmq.PUSH, cluster.control.hello[card]["fabric"], cluster._secret)
    try:
        for f in frames:
            sock.send_multipart(f)
        assert llm.generate([PROMPT], GREEDY)[0].token_ids == reference
    finally:
        sock.close()
    _alive(llm)


# -- step plans ----------------------------------------------------------------------------------------
seq_slices = st.lists(st.one_of(st.integers(-3, 40), values), min_size=0, max_size=5)
plans = st.fixed_dictionaries({}, optional={
    "t": st.one_of(st.integers(-5, 10 ** 6), values),
    "seqs": st.one_of(st.lists(st.one_of(
        st.tuples(st.integers(-2, 3), st.integers(-2, 20), st.integers(-2, 40),
                  st.lists(st.one_of(st.integers(-3, 300), values), max_size=4)).map(list), values), max_size=3),
        values),
    "rows": st.one_of(st.lists(st.integers(-2, 20), max_size=3), values),
    "tok": st.one_of(st.binary(max_size=80), values),
    "out": st.one_of(st.integers(-2, 3), values),
})


@FUZZ
@given(blob=st.one_of(st.binary(max_size=64), plans.map(lambda d: msgpack.packb(d, use_bin_type=True))))
def test_step_plans_from_random_bytes_and_fields(llm, reference, blob):
    eng = llm.engine
    futs = [eng.cluster.control.submit(c, "step", None, [blob]) for c in eng.cards]
    outcomes = []
    for f in futs:  # every card checks the same bytes the same way: all run it or all refuse it
        try:
            f.result(30)
            outcomes.append("ran")
        except Exception as exc:
            assert "failed" in str(exc) and "plan" in str(exc) or "KV block" in str(exc) or "token" in str(exc), exc
            outcomes.append("refused")
    assert len(set(outcomes)) == 1, outcomes
    _alive(llm)


def test_reference_tokens_after_random_plans(llm, reference):
    assert llm.generate([PROMPT], GREEDY)[0].token_ids == reference


# -- control messages -----------------------------------------------------------------------------------
control_headers = st.fixed_dictionaries({"op": st.sampled_from(["reply", "hello", "heartbeat", "status", ""])},
                                        optional={"id": values, "card": st.one_of(st.integers(-2, 5), values),
                                                  "ok": values, "error": values, "kind": values, "pid": values,
                                                  "fabric": values, "secret": values, "clock_ns": values,
                                                  "shape": values})


@pytest.fixture(scope="module")
def forgers(llm):
    """Sockets that take the identities of card 1 (dead, so its names are free) and of strangers."""
    cluster = llm.engine.cluster
    cluster.kill(1)
    assert wait_until(lambda: 1 in cluster.control.dead, 5.0)
    endpoint = f"ipc://{cluster.run_dir}/control"
    socks = [_socket(zmq.DEALER, endpoint, cluster._secret, ident) for ident in (b"card1", b"card1.hb", b"card7")]
    yield socks
    for s in socks:
        s.close()
    time.sleep(0.2)  # the host's ROUTER lets go of the identities before card 1 comes back with them


@FUZZ
@given(msgs=st.lists(st.tuples(st.integers(0, 2), st.one_of(
    st.binary(max_size=48).map(lambda b: [b]),
    control_headers.map(lambda h: [msgpack.packb(h, use_bin_type=True)]),
    st.tuples(control_headers, st.binary(max_size=16)).map(lambda hp: [msgpack.packb(hp[0], use_bin_type=True),
                                                                         hp[1]]))), min_size=1, max_size=6),
       with_secret=st.booleans())
def test_control_messages_from_random_bytes_and_fields(llm, forgers, msgs, with_secret):
    cluster = llm.engine.cluster
    before = sum(cluster.control.malformed.values())
    for i, frames in msgs:
        if with_secret and frames[0][:1] in (b"\x80", b"\x81", b"\x82", b"\x83", b"\x84", b"\x85", b"\x86"):
            try:  # a random frame that only starts like a map stays as it is
                h = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
            except (ValueError, msgpack.UnpackException):
                h = None
            if isinstance(h, dict):
                frames = [msgpack.packb({**h, "secret": cluster._secret}, use_bin_type=True), *frames[1:]]
        forgers[i].send_multipart(frames)
    assert cluster.control.call(0, "status", timeout=10)[0]["card"] == 0  # the I/O thread still serves
    assert cluster.control._thread.is_alive()
    assert sum(cluster.control.malformed.values()) >= before
    assert set(cluster.control.hello) <= {0, 1} and set(cluster.control.last_seen) <= {0, 1}


@pytest.mark.restarts_cards
def test_after_forged_control_messages_recover_gives_the_reference(llm, reference, forgers):
    for s in forgers:
        s.close()
    time.sleep(0.2)
    llm.engine.recover()
    assert llm.generate([PROMPT], GREEDY)[0].token_ids == reference
    _alive(llm)
