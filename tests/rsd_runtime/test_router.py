"""The live router over two tiny-model instance servers: routing by policy, passthrough, health, failures."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from rsd_runtime.router import Router, route_request
from rsd_runtime.routing import get_policy
from rsd_runtime.server.launch import ServerProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RouterThread:
    """A router served by uvicorn in a thread of the test process, on a free port."""

    def __init__(self, backends, policy="round-robin", **options):
        self.router = Router(backends, get_policy(policy), **options)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.router.app(), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the router did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    def complete(self, prompt, max_tokens=4, **extra):
        r = httpx.post(self.base_url + "/v1/completions", timeout=60,
                       json={"model": "tiny-llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})
        return r


@pytest.fixture(scope="module")
def instances():
    with ServerProcess(tp=1) as a, ServerProcess(tp=1) as b:
        yield [a, b]


def served_by(r) -> str:
    assert r.status_code == 200, r.text
    return r.headers["x-rsd-instance"]


def test_round_robin_alternates_and_passes_through(instances):
    with RouterThread([s.base_url for s in instances], "round-robin") as rt:
        names = [served_by(rt.complete("Hello there")) for _ in range(4)]
        assert names == ["instance0", "instance1", "instance0", "instance1"]
        direct = httpx.post(instances[0].base_url + "/v1/completions", timeout=60, json={
            "model": "tiny-llama", "prompt": "Hello there", "max_tokens": 4, "temperature": 0}).json()
        assert rt.complete("Hello there").json()["choices"][0]["text"] == direct["choices"][0]["text"]


def test_streaming_through_the_router_with_the_openai_client(instances):
    with RouterThread([s.base_url for s in instances], "round-robin") as rt:
        client = openai.OpenAI(base_url=rt.base_url + "/v1", api_key="none")
        direct = openai.OpenAI(base_url=instances[1].base_url + "/v1", api_key="none")
        want = direct.completions.create(model="tiny-llama", prompt="The sky", max_tokens=6, temperature=0)
        stream = client.completions.create(model="tiny-llama", prompt="The sky", max_tokens=6, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == want.choices[0].text
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == want.usage.completion_tokens


def test_session_pins_a_client_and_prefix_affinity_follows_the_prefix(instances):
    urls = [s.base_url for s in instances]
    with RouterThread(urls, "session") as rt:
        for user in ("alice", "bob", "carol"):
            got = {served_by(rt.complete("hi", user=user)) for _ in range(3)}
            assert len(got) == 1, (user, got)
    with RouterThread(urls, "prefix-affinity") as rt:
        prefix = "Once upon a time in a land far away there lived " * 3
        first = served_by(rt.complete(prefix + "a king"))
        assert all(served_by(rt.complete(prefix + end)) == first for end in ("a queen", "a frog", "a dragon"))


def test_least_outstanding_avoids_the_busy_instance(instances):
    with RouterThread([s.base_url for s in instances], "least-outstanding") as rt:
        async def run():
            async with httpx.AsyncClient(timeout=60) as c:
                async with c.stream("POST", rt.base_url + "/v1/completions", json={
                        "model": "tiny-llama", "prompt": "long", "max_tokens": 200, "ignore_eos": True,
                        "stream": True}) as busy:
                    busy_on = busy.headers["x-rsd-instance"]
                    others = [served_by(await c.post(rt.base_url + "/v1/completions", json={
                        "model": "tiny-llama", "prompt": "short", "max_tokens": 2})) for _ in range(3)]
                    return busy_on, others
        busy_on, others = asyncio.run(run())
        assert busy_on not in others


def test_health_lists_instances_with_card_pids_and_metrics_carry_both(instances):
    from prometheus_client.parser import text_string_to_metric_families

    with RouterThread([s.base_url for s in instances], "round-robin") as rt:
        rt.complete("x")
        h = httpx.get(rt.base_url + "/health").json()
        assert h["status"] == "ok" and [i["url"] for i in h["instances"]] == [s.base_url for s in instances]
        assert all(i["state"] == "healthy" and i["cards"] for i in h["instances"])
        text = httpx.get(rt.base_url + "/metrics").text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert "rsd_router:requests" in fams
        inst = {s.labels.get("instance") for f in fams.values() if f.name.startswith("rsd:") for s in f.samples}
        assert {"instance0", "instance1"} <= inst
        models = httpx.get(rt.base_url + "/v1/models").json()
        assert models == httpx.get(instances[0].base_url + "/v1/models").json()  # vocab_size, max_model_len too


class _Garbage:
    """A real TCP server that answers every HTTP request with 200 and bytes that are not JSON."""

    def __init__(self, answer: bool = True):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.answer = answer
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.answer:
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\nnot json!")
                except OSError:
                    pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_bad_backends_are_skipped_never_crash_the_router(instances):
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    garbage, silent = _Garbage(answer=True), _Garbage(answer=False)
    try:
        with RouterThread([refused, garbage.url, silent.url, instances[0].base_url], "round-robin",
                          health_timeout=0.5, request_timeout=2.0) as rt:
            h = httpx.get(rt.base_url + "/health").json()
            states = {i["url"]: i["state"] for i in h["instances"]}
            assert states[instances[0].base_url] == "healthy"
            assert all(states[u] == "unhealthy" for u in (refused, garbage.url, silent.url)), states
            assert h["status"] == "degraded"
            for _ in range(4):
                assert served_by(rt.complete("still fine")) == "instance3"
            assert httpx.post(rt.base_url + "/v1/completions", content=b"{nope").status_code == 400
    finally:
        garbage.close()
        silent.close()


def test_bad_router_configuration_is_refused():
    with pytest.raises(ValueError, match="unknown routing policy"):
        get_policy("fastest")
    with pytest.raises(ValueError, match="not an http"):
        Router(["localhost:80"], get_policy("round-robin"))
    with pytest.raises(ValueError, match="at least one"):
        Router([], get_policy("round-robin"))


def test_route_request_reads_tokens_text_and_session():
    rr = route_request({"prompt": [1, 2, 3], "user": "u"}, {})
    assert rr.tokens == [1, 2, 3] and rr.session == "u"
    rr = route_request({"messages": [{"role": "user", "content": "hi"}]}, {"x-session-id": "s"})
    assert rr.text == "hi" and rr.session == "s"


def test_litellm_router_drives_the_instance_servers(instances):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm")
    model_list = [{"model_name": "rack", "litellm_params": {"model": f"openai/{_model_id(s)}",
                                                              "api_base": s.base_url + "/v1", "api_key": "none"}}
                  for s in instances]
    router = litellm.Router(model_list=model_list, routing_strategy="simple-shuffle", num_retries=0)
    before = sum(_successes(s) for s in instances)
    direct = openai.OpenAI(base_url=instances[0].base_url + "/v1", api_key="none").chat.completions.create(
        model=_model_id(instances[0]), messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0)
    for _ in range(4):
        resp = router.completion(model="rack", messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
                                 temperature=0)
        assert resp.choices[0].message.content == direct.choices[0].message.content
        assert resp.usage.completion_tokens == direct.usage.completion_tokens
    assert sum(_successes(s) for s in instances) == before + 5  # LiteLLM's four, and the direct one


def _successes(server) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(server.base_url + "/metrics").text)}
    return sum(s.value for s in fams["rsd:request_success"].samples if s.name.endswith("_total"))


def _model_id(server) -> str:
    return httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]


def test_a_killed_card_sends_new_requests_to_the_other_instance():
    with ServerProcess(tp=1) as a, ServerProcess(tp=1) as b:
        with RouterThread([a.base_url, b.base_url], "round-robin", health_interval=0.5) as rt:
            assert {served_by(rt.complete("x")) for _ in range(2)} == {"instance0", "instance1"}
            pid = httpx.get(b.base_url + "/health").json()["cards"][0]["pid"]
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            during = []  # sent before the router's health check saw the failure: retried if they hit instance1
            while httpx.get(rt.base_url + "/health").json()["instances"][1]["state"] == "healthy":
                assert time.monotonic() - t0 < 3.0, "the router did not see the dead card within 3 s"
                during.append(served_by(rt.complete("y")))
            assert set(during) <= {"instance0"}
            for _ in range(4):
                assert served_by(rt.complete("y")) == "instance0"
            h = httpx.get(rt.base_url + "/health").json()
            assert h["instances"][1]["state"] == "unhealthy" and h["status"] == "degraded"


def test_a_rack_from_the_command_line_stops_whole_on_sigterm():
    """rsd-launch serve --instances 2: two instance servers and a router; SIGTERM leaves nothing behind."""
    import psutil

    with ServerProcess(tp=1, extra_args=["--instances", "2", "--routing", "round-robin"]) as rack:
        h = httpx.get(rack.base_url + "/health").json()
        assert [i["name"] for i in h["instances"]] == ["instance0", "instance1"]
        assert all(i["state"] == "healthy" and len(i["cards"]) == 1 for i in h["instances"])
        seen = {httpx.post(rack.base_url + "/v1/completions", timeout=60, json={
            "model": "tiny-llama", "prompt": "Hi", "max_tokens": 2}).headers["x-rsd-instance"] for _ in range(2)}
        assert seen == {"instance0", "instance1"}
        children = psutil.Process(rack.proc.pid).children(recursive=True)
        assert len(children) >= 4  # two servers, one card each
    # the context exit sent SIGTERM and checked that no card process, segment or run directory is left
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


def test_bench_serve_drives_the_router_and_counts_each_instance(instances, tmp_path):
    from bench import serve

    out, png = tmp_path / "rack.json", tmp_path / "rack.png"
    with RouterThread([s.base_url for s in instances], "round-robin") as rt:
        code = serve.main(["--base-url", rt.base_url, "--num-prompts", "4", "--max-concurrency", "1",
                           "--input-len", "8", "--output-len", "3", "--json", str(out), "--plot", str(png),
                           "--disable-tqdm"])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["completed"] == 4 and doc["served_per_instance"] == {"instance0": 2, "instance1": 2}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
