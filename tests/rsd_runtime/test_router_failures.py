"""The router's failure paths against scripted backends on real sockets: retries before the first token,
an error event mid-stream, cooldown after allowed failures, and an instance used again once it is back."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_router import RouterThread


class Scripted:
    """An HTTP server on a free loopback port whose answers follow ``mode``:

    ok          /health 200, completions 200 with a JSON body (or a two-chunk stream)
    fail        completions answer 500
    early-drop  a 200 stream that closes before its first chunk
    error-first a 200 stream whose first event is an error (the instance failed before any token)
    mid-drop    a 200 stream that sends one chunk, then drops the connection
    mid-error   a 200 stream that sends one chunk, then an error event and [DONE]
    sick        /health answers 503
    """

    def __init__(self, name: str, mode: str = "ok"):
        self.name, self.mode, self.posts = name, mode, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _json(self, status: int, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    self._json(503 if outer.mode == "sick" else 200, {"status": "ok", "cards": [{"pid": 1}]})
                elif self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": "scripted"}]})
                else:
                    self._json(404, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.posts += 1
                if outer.mode == "fail":
                    return self._json(500, {"error": {"message": "scripted failure"}})
                if not body.get("stream"):
                    return self._json(200, {"choices": [{"text": outer.name}]})
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                fail = {"error": {"message": "the cards failed"}}
                chunks = {"early-drop": [], "error-first": [fail],
                          "mid-error": [{"choices": [{"text": outer.name}]}, fail]}.get(
                    outer.mode, [{"choices": [{"text": outer.name}]}])
                if outer.mode == "ok":
                    chunks.append({"choices": [{"text": "!"}]})
                for c in chunks:
                    data = f"data: {json.dumps(c)}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                if outer.mode in ("ok", "error-first", "mid-error"):
                    data = b"data: [DONE]\n\n"
                    self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
                else:  # drop the connection without the closing chunk
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    made = []

    def make(name, mode="ok"):
        made.append(Scripted(name, mode))
        return made[-1]
    yield make
    for s in made:
        s.close()


def post(rt, stream=False):
    return httpx.post(rt.base_url + "/v1/completions", timeout=10,
                      json={"model": "scripted", "prompt": "x", "max_tokens": 2, "stream": stream})


def retries(rt) -> float:
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(rt.base_url + "/metrics").text)}
    return sum(s.value for s in fams["rsd_router:retries"].samples if s.name.endswith("_total"))


def states(rt) -> list[str]:
    return [i["state"] for i in httpx.get(rt.base_url + "/health").json()["instances"]]


@pytest.mark.parametrize("mode,stream", [("fail", False), ("fail", True), ("early-drop", True),
                                         ("error-first", True)])
def test_a_request_that_fails_before_its_first_token_is_retried_on_another(scripted, mode, stream):
    bad, good = scripted("bad", mode), scripted("good")
    with RouterThread([bad.url, good.url], "round-robin", allowed_fails=100) as rt:
        r = post(rt, stream)
        assert r.status_code == 200 and r.headers["x-rsd-instance"] == "instance1"
        assert "good" in r.text and bad.posts == 1 and good.posts == 1
        assert retries(rt) == 1
        assert states(rt) == ["healthy", "healthy"]  # one failure is under allowed_fails


def test_a_stream_that_breaks_mid_way_ends_with_an_error_event(scripted):
    bad = scripted("bad", "mid-drop")
    with RouterThread([bad.url], "round-robin", allowed_fails=100) as rt:
        with httpx.stream("POST", rt.base_url + "/v1/completions", timeout=10,
                          json={"model": "scripted", "prompt": "x", "stream": True}) as r:
            assert r.status_code == 200 and r.headers["x-rsd-instance"] == "instance0"
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[0])["choices"][0]["text"] == "bad"  # the token before the break got through
        err = json.loads(events[1])["error"]
        assert "instance0 failed mid-stream" in err["message"] and err["code"] == 502
        assert events[2:] == ["[DONE]"]
        assert retries(rt) == 0  # a token was out: no retry


def test_an_error_event_from_the_instance_mid_stream_is_passed_through_and_counted(scripted):
    bad = scripted("bad", "mid-error")
    with RouterThread([bad.url], "round-robin", allowed_fails=100) as rt:
        with httpx.stream("POST", rt.base_url + "/v1/completions", timeout=10,
                          json={"model": "scripted", "prompt": "x", "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert [list(json.loads(e)) for e in events[:2]] == [["choices"], ["error"]] and events[2:] == ["[DONE]"]
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(rt.base_url + "/metrics").text)}
        counted = {s.labels["status"]: s.value for s in fams["rsd_router:requests"].samples
                   if s.name.endswith("_total")}
        assert counted == {"500": 1.0} and retries(rt) == 0
        assert "the cards failed" in httpx.get(rt.base_url + "/health").json()["instances"][0]["last_error"]


def test_allowed_fails_put_an_instance_in_cooldown_and_it_is_used_again_after(scripted):
    flaky, good = scripted("flaky", "fail"), scripted("good")
    cooldown = 2.0
    with RouterThread([flaky.url, good.url], "round-robin", allowed_fails=2, cooldown_s=cooldown,
                      health_interval=0.1) as rt:
        assert post(rt).headers["x-rsd-instance"] == "instance1"  # failed on flaky, retried on good
        t_second = time.monotonic()  # the second failure, which starts the cooldown, comes after this
        assert post(rt).headers["x-rsd-instance"] == "instance1"
        assert states(rt) == ["cooldown", "healthy"]
        assert "scripted failure" in httpx.get(rt.base_url + "/health").json()["instances"][0]["last_error"]
        flaky.mode = "ok"
        before = flaky.posts
        got = {post(rt).headers["x-rsd-instance"] for _ in range(3)}
        if time.monotonic() - t_second < cooldown:
            assert got == {"instance1"} and flaky.posts == before  # skipped while in cooldown
        while states(rt)[0] != "healthy":
            assert time.monotonic() - t_second < cooldown + 10, "the cooldown did not end"
            time.sleep(0.05)
        assert time.monotonic() - t_second >= cooldown  # not before the cooldown ran out
        assert {post(rt).headers["x-rsd-instance"] for _ in range(4)} == {"instance0", "instance1"}


def test_an_instance_whose_health_fails_is_skipped_until_it_passes_again(scripted):
    a, b = scripted("a"), scripted("b")
    with RouterThread([a.url, b.url], "round-robin", health_interval=0.1) as rt:
        a.mode = "sick"
        t0 = time.monotonic()
        while states(rt)[0] == "healthy":
            assert time.monotonic() - t0 < 10.0
            time.sleep(0.05)
        h = httpx.get(rt.base_url + "/health").json()
        assert h["status"] == "degraded" and "503" in h["instances"][0]["last_error"]
        assert {post(rt).headers["x-rsd-instance"] for _ in range(4)} == {"instance1"}
        a.mode = "ok"
        while states(rt)[0] != "healthy":
            assert time.monotonic() - t0 < 20.0
            time.sleep(0.05)
        assert {post(rt).headers["x-rsd-instance"] for _ in range(4)} == {"instance0", "instance1"}


def test_no_healthy_instance_is_a_clear_503(scripted):
    a = scripted("a", "sick")
    with RouterThread([a.url], "round-robin") as rt:
        r = post(rt)
        assert r.status_code == 503 and "no instance can take the request" in r.json()["error"]["message"]
        assert httpx.get(rt.base_url + "/health").status_code == 503


def _rsd_launch(*args, **kw):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("rsd-launch", path=str(Path(sys.executable).parent)) or shutil.which("rsd-launch")
    cmd = [exe] if exe else [sys.executable, "-m", "rsd_runtime.cli"]
    return subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_rsd_launch_router_bundles_running_servers_and_stops_on_sigterm(scripted):
    import signal

    from test_router import free_port

    a, b = scripted("a"), scripted("b")
    port = free_port()
    proc = _rsd_launch("router", "--backend", a.url, "--backend", b.url, "--routing", "round-robin",
                       "--port", str(port))
    try:
        url, t0 = f"http://127.0.0.1:{port}", time.monotonic()
        while True:
            try:
                h = httpx.get(url + "/health", timeout=1).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() - t0 < 30, proc.stderr.read() if proc.poll() else ""
                time.sleep(0.1)
        assert [(i["url"], i["state"]) for i in h["instances"]] == [(a.url, "healthy"), (b.url, "healthy")]
        assert h["routing"] == "round-robin"
        got = [httpx.post(url + "/v1/completions", json={"prompt": "x"}).json()["choices"][0]["text"]
               for _ in range(2)]
        assert got == ["a", "b"]
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "scripted"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


@pytest.mark.parametrize("args,flag", [
    (["--backend", "localhost:80"], "backend 'localhost:80' is not an http(s) URL"),
    (["--backend", "http://127.0.0.1:1", "--routing", "fastest"], "--routing"),
    (["--backend", "http://127.0.0.1:1", "--cooldown", "-1"], "--cooldown"),
    (["--backend", "http://127.0.0.1:1", "--health-timeout", "0"], "--health-timeout must be > 0"),
])
def test_rsd_launch_router_refuses_bad_options_in_one_line(args, flag, capsys):
    from rsd_runtime import cli

    try:
        code = cli.main(["router", *args])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and flag in err and "Traceback" not in err, err
