"""Only the run's own processes get through: secrets, private directories, loopback, bad frames."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import zmq

from conftest import wait_until
from interconnect import auth
from rsd_runtime import Cluster


@pytest.fixture(scope="module")
def cluster(shm_prefix):
    with Cluster(num_devices=2, shm_prefix=shm_prefix) as c:
        yield c


def _push(endpoint: str, secret: str | None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    if secret is not None:
        auth.make_client(sock, secret)
    sock.connect(endpoint)
    return sock


def _works(cluster) -> bool:
    res = cluster.collective("all_reduce", [np.ones(5, np.float32), np.ones(5, np.float32)], group=[0, 1])
    return all(np.array_equal(o, np.full(5, 2, np.float32)) for o in res["outputs"])


@pytest.mark.parametrize("secret", [None, "not-the-secret"])
def test_fabric_connection_without_the_secret_is_refused(cluster, secret):
    endpoint = cluster.control.hello[0]["fabric"]
    before = cluster.status()[0]
    sock = _push(endpoint, secret)
    sock.send_multipart([b"\x81\xa2op\xa3p2p", b"x" * 100], flags=zmq.NOBLOCK) if sock.poll(200, zmq.POLLOUT) else None
    if secret is not None:
        assert wait_until(lambda: cluster.status()[0]["fabric_refused"] > before["fabric_refused"], 3.0)
    sock.close()
    after = cluster.status()[0]
    assert after["fabric_malformed"] == before["fabric_malformed"]  # nothing was delivered
    assert _works(cluster)


def test_control_connection_without_the_secret_is_refused(cluster):
    refused = cluster._auth.refused
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    auth.make_client(sock, "guess")
    sock.connect(f"ipc://{cluster.run_dir}/control")
    assert wait_until(lambda: cluster._auth.refused > refused, 3.0)
    sock.close()
    assert cluster.status()[1]["state"] == "idle"


def test_malformed_frames_are_rejected_and_the_card_lives_on(cluster):
    sock = _push(cluster.control.hello[1]["fabric"], cluster._secret)
    before = cluster.status()[1]["fabric_malformed"]
    sock.send(b"\xc1 not msgpack")
    sock.send_multipart([b"\x81\xa2op\xa3p2p", b"payload"])  # a header without src/tag/stamp
    sock.send(b"\x82\xa2op\xa3ack\xa5token\x7f")  # an ack for a message never sent
    assert wait_until(lambda: _works(cluster) and cluster.status()[1]["fabric_malformed"] >= before + 3, 5.0)
    sock.close()


def test_run_directory_is_private_and_tcp_binds_loopback(shm_prefix, cluster):
    mode = stat.S_IMODE(os.stat(cluster.run_dir).st_mode)
    assert mode == 0o700
    with Cluster(num_devices=2, shm_prefix=shm_prefix, transport="tcp") as c:
        endpoints = [c.control.hello[i]["fabric"] for i in range(2)]
        assert all(e.startswith("tcp://127.0.0.1:") for e in endpoints)
        assert _works(c)


def _forger(cluster, identity: bytes) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    auth.make_client(sock, cluster._secret)
    sock.connect(f"ipc://{cluster.run_dir}/control")
    return sock


def test_control_plane_survives_bad_messages_from_a_peer_with_the_secret(cluster):
    from interconnect import wire

    secret = cluster._secret
    bad = [
        {"op": "reply", "id": [1, 2], "ok": True},
        {"op": "reply", "id": {"a": 1}},
        {"op": "heartbeat", "card": "zero", "secret": secret},
        {"op": "heartbeat", "secret": secret},
        {"op": "hello", "card": 99, "pid": 1, "secret": secret, "fabric": "ipc:///nowhere"},
        {"op": "hello", "card": 1.5, "secret": secret},
        {"op": 7},
    ]
    before = cluster.malformed()["control"]
    for identity in (b"card9", b"intruder", b"card0.hb.x"):
        sock = _forger(cluster, identity)
        for h in bad:
            sock.send_multipart([wire.pack(h), b"x"])
        sock.send(b"\xc1not msgpack")
        assert wait_until(lambda: cluster.malformed()["control"] >= before + len(bad) + 1, 5.0)
        before = cluster.malformed()["control"]
        sock.close()
    assert cluster.control._thread.is_alive()
    assert sorted(cluster.control.hello) == [0, 1] and 99 not in cluster.control.last_seen
    cluster.check()  # no card reported dead by a forged hello
    assert cluster.health()["malformed"]["control_reasons"]["identity"] >= 3 * (len(bad) + 1)
    assert _works(cluster)


def test_fabric_headers_naming_unknown_cards_or_windows_are_refused_and_collectives_go_on(cluster):
    from interconnect import wire

    base = {"op": "p2p", "nbytes": 64, "start": 0, "occ": 1, "lat": 1}
    bad = [
        {**base, "src": 7, "tag": [0, 0, 1], "shm": [0, 1]},  # a window of a card that does not exist
        {**base, "src": 1, "tag": [0, 0, 1], "shm": [1 << 40, 1]},  # outside card 1's window
        {**base, "src": 1, "tag": [0, 0, 1], "shm": [-64, 1]},
        {**base, "src": 1, "tag": [0, 0, 1], "nbytes": -5},
        {**base, "src": "1", "tag": [0]},
        {**base, "src": 1, "tag": [[1], {"a": 2}]},
        {"op": "ack", "src": 1, "token": 10 ** 12},
        {"op": "ack", "src": 9, "token": 1},
        {"op": "meta", "src": 1, "tag": [0], "meta": ["x"]},
    ]
    before = cluster.status()[0]["fabric_malformed"]
    sock = _push(cluster.control.hello[0]["fabric"], cluster._secret)
    for h in bad:
        sock.send(wire.pack(h))
    # card 0 files what arrived while it waits inside a collective
    assert wait_until(lambda: _works(cluster) and cluster.status()[0]["fabric_malformed"] >= before + len(bad), 5.0), \
        cluster.status()[0]["fabric_malformed"] - before
    assert cluster.health()["malformed"]["fabric"] >= len(bad)
    sock.close()
    assert _works(cluster)
