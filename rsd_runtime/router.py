"""The rack's front door: one OpenAI-compatible endpoint over many instance servers.

    router = Router(["http://127.0.0.1:8001", "http://127.0.0.1:8002"], get_policy("least-outstanding"))
    uvicorn.run(router.app(), host="127.0.0.1", port=8000)

Every request is parsed just enough to route it (the prompt's token ids or
text, a session key from the ``x-session-id`` header or the ``user`` field),
the routing policy picks an instance (the same policy objects the replay on
the emulated clock uses, ``rsd_runtime.routing``), and the request is passed
through; streams are relayed chunk by chunk. Every response carries the
header ``x-rsd-instance`` naming the instance that served it.

Failures, as LiteLLM's Router treats its deployments:

* a health check (``GET /health`` of each instance every ``health_interval``
  seconds) that fails or times out takes the instance out until a check passes;
* a request that fails on an instance (connection refused, timeout, 5xx)
  counts against it; ``allowed_fails`` failures within a minute put it in
  cooldown for ``cooldown_s`` seconds (LiteLLM's defaults: 3 fails, 5 s);
  a refused connection takes it out at once;
* a request that fails before its first token is retried on another instance
  (``num_retries`` times); one that fails mid-stream ends with an error event.

The router's ``/health`` lists every instance with its URL, state and the
pids of its cards; ``/metrics`` holds the router's own counters and each
instance's metrics, labelled with the instance's name.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from rsd_runtime.routing import NoWorker, Policy, RouteRequest, WorkerState

log = logging.getLogger("rsd.router")

# LiteLLM Router defaults (docs.litellm.ai, router configuration): allowed_fails=3 per minute, cooldown_time=5 s
ALLOWED_FAILS = 3
COOLDOWN_S = 5.0
FAIL_WINDOW_S = 60.0
ERROR_EVENT = b'data: {"error"'  # how an instance's stream starts when it failed before any token


@dataclass
class Backend:
    url: str
    name: str
    state: str = "unknown"  # healthy | unhealthy | cooldown | unknown
    cooldown_until: float = 0.0
    fail_times: list[float] = field(default_factory=list)
    last_error: str | None = None
    cards: list = field(default_factory=list)  # what the instance's /health says of its cards
    models: list[dict] = field(default_factory=list)  # the instance's /v1/models entries, passed through


def _error(status: int, message: str, kind: str = "server_error") -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": kind, "param": None, "code": status}}


def route_request(body: dict, headers) -> RouteRequest:
    """What the policy sees of an OpenAI request: token ids or text, and a session key."""
    session = headers.get("x-session-id") or (body.get("user") if isinstance(body.get("user"), str) else None)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return RouteRequest(tokens=prompt, session=session)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        return RouteRequest(tokens=prompt[0], session=session)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return RouteRequest(text=prompt[0], session=session)
    if isinstance(prompt, str):
        return RouteRequest(text=prompt, session=session)
    messages = body.get("messages")
    if isinstance(messages, list):
        text = "\n".join(m.get("content") for m in messages
                         if isinstance(m, dict) and isinstance(m.get("content"), str))
        return RouteRequest(text=text, session=session)
    return RouteRequest(text="", session=session)


class Router:
    def __init__(self, backends: list[str], policy: Policy, *, names: list[str] | None = None,
                 health_interval: float = 1.0, health_timeout: float = 2.0, request_timeout: float = 600.0,
                 allowed_fails: int = ALLOWED_FAILS, cooldown_s: float = COOLDOWN_S, num_retries: int = 2):
        if not backends:
            raise ValueError("a router needs at least one --backend URL")
        urls = [self._check_url(u) for u in backends]
        if len(set(urls)) != len(urls):
            raise ValueError(f"a backend URL is given twice: {urls}")
        names = names or [f"instance{i}" for i in range(len(urls))]
        self.backends = [Backend(u, n) for u, n in zip(urls, names)]
        self.workers = [WorkerState(n, healthy=False) for n in names]
        self.policy = policy
        self.health_interval, self.health_timeout = health_interval, health_timeout
        self.request_timeout = request_timeout
        self.allowed_fails, self.cooldown_s, self.num_retries = allowed_fails, cooldown_s, num_retries
        self.registry = CollectorRegistry()
        self.m_requests = Counter("rsd_router:requests", "Requests answered, by instance and status",
                                  ["instance", "status"], registry=self.registry)
        self.m_retries = Counter("rsd_router:retries", "Requests retried on another instance",
                                 registry=self.registry)
        self.m_healthy = Gauge("rsd_router:instance_healthy", "1 when the instance takes requests",
                               ["instance"], registry=self.registry)
        self.m_outstanding = Gauge("rsd_router:instance_outstanding", "Requests in flight on the instance",
                                   ["instance"], registry=self.registry)
        self.m_latency = Histogram("rsd_router:request_latency_seconds", "End-to-end latency through the router "
                                   "(wall clock)", ["instance"], registry=self.registry,
                                   buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self._scraped: list[Metric] = []
        self.registry.register(self)  # collect() below adds what the instances export
        self._client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task | None = None

    @staticmethod
    def _check_url(url: str) -> str:
        u = httpx.URL(url)
        if u.scheme not in ("http", "https") or not u.host:
            raise ValueError(f"backend {url!r} is not an http(s) URL with a host")
        return str(u).rstrip("/")

    # ---- prometheus: the instances' metrics, labelled with the instance ----
    def collect(self):
        return list(self._scraped)

    async def _scrape(self) -> None:
        async def one(b: Backend):
            try:
                r = await self._client.get(b.url + "/metrics", timeout=self.health_timeout)
                r.raise_for_status()
                return b, list(text_string_to_metric_families(r.text))
            except Exception as e:  # an instance that cannot be scraped is left out of this scrape
                log.debug("scrape of %s failed: %s", b.name, e)
                return b, []
        merged: dict[str, Metric] = {}
        for b, families in await asyncio.gather(*(one(b) for b in self.backends)):
            for fam in families:
                m = merged.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
                for s in fam.samples:
                    m.add_sample(s.name, {**s.labels, "instance": b.name}, s.value, s.timestamp)
        self._scraped = list(merged.values())

    # ---- instance state ----
    def _set_state(self, i: int, state: str, error: str | None = None) -> None:
        b = self.backends[i]
        if state != b.state:
            log.info("instance %s (%s): %s -> %s%s", b.name, b.url, b.state, state, f" ({error})" if error else "")
        b.state = state
        if error:
            b.last_error = error
        self.workers[i].healthy = state == "healthy"
        self.m_healthy.labels(b.name).set(1 if state == "healthy" else 0)

    def _failed(self, i: int, error: str, *, down: bool = False) -> None:
        b, now = self.backends[i], time.monotonic()
        b.fail_times = [t for t in b.fail_times if now - t < FAIL_WINDOW_S] + [now]
        if down:
            self._set_state(i, "unhealthy", error)
        elif len(b.fail_times) >= self.allowed_fails:
            b.cooldown_until = now + self.cooldown_s
            self._set_state(i, "cooldown", error)
        else:
            b.last_error = error

    async def check_health(self) -> None:
        async def one(i: int, b: Backend):
            try:
                r = await self._client.get(b.url + "/health", timeout=self.health_timeout)
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            except (httpx.HTTPError, ValueError) as e:
                self._set_state(i, "unhealthy", f"health check failed: {type(e).__name__}: {e}")
                return
            if isinstance(body, dict) and isinstance(body.get("cards"), list):
                b.cards = body["cards"]
            if r.status_code != 200:
                reason = body.get("reason") or body.get("status") if isinstance(body, dict) else None
                self._set_state(i, "unhealthy", f"/health answered {r.status_code}" + (f": {reason}" if reason else ""))
            elif b.state == "cooldown" and time.monotonic() < b.cooldown_until:
                pass
            else:
                if not b.models:
                    try:
                        models = (await self._client.get(b.url + "/v1/models", timeout=self.health_timeout)).json()
                        b.models = [m for m in models["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]
                    except (httpx.HTTPError, ValueError, KeyError, TypeError):
                        pass
                self._set_state(i, "healthy")
        await asyncio.gather(*(one(i, b) for i, b in enumerate(self.backends)))

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check_health()
            except Exception:  # the loop must outlive any one bad answer
                log.exception("health check round failed")
            await asyncio.sleep(self.health_interval)

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.request_timeout, connect=self.health_timeout),
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        if self._client is not None:
            await self._client.aclose()

    def health(self) -> tuple[int, dict]:
        inst = [{"name": b.name, "url": b.url, "state": b.state, "last_error": b.last_error,
                 "outstanding": w.outstanding, "served": w.served, "cards": b.cards}
                for b, w in zip(self.backends, self.workers)]
        up = sum(w.healthy for w in self.workers)
        status = "ok" if up == len(self.workers) else "degraded" if up else "down"
        return (200 if up else 503), {"status": status, "routing": self.policy.name, "healthy": up,
                                      "instances": inst}

    # ---- requests ----
    def _choose(self, rr: RouteRequest, tried: set[int]) -> int:
        now = time.monotonic()
        for i, b in enumerate(self.backends):  # a cooldown that has run out ends here, not only at a check
            if b.state == "cooldown" and now >= b.cooldown_until:
                self._set_state(i, "healthy")
        saved = [w.healthy for w in self.workers]
        for i in tried:
            self.workers[i].healthy = False
        try:
            return self.policy.choose(rr, self.workers)
        finally:
            for w, h in zip(self.workers, saved):
                w.healthy = h

    async def proxy(self, path: str, raw: bytes, headers) -> tuple:
        """('json', status, body, instance) or ('stream', first_chunk, iterator, instance, done)."""
        try:
            body = json.loads(raw)
        except ValueError as e:
            return ("json", *_error(400, f"the request body is not valid JSON: {e}", "invalid_request_error"), None)
        if not isinstance(body, dict):
            return ("json", *_error(400, "the request body must be a JSON object", "invalid_request_error"), None)
        rr = route_request(body, headers)
        stream = body.get("stream") is True
        tried: set[int] = set()
        last = "no instance was tried"
        for attempt in range(self.num_retries + 1):
            try:
                i = self._choose(rr, tried)
            except NoWorker as e:
                return ("json", *_error(503, f"no instance can take the request: {e}; last error: {last}"), None)
            if attempt:
                self.m_retries.inc()
            tried.add(i)
            b, w = self.backends[i], self.workers[i]
            self.policy.on_dispatch(rr, w)
            w.outstanding += 1
            self.m_outstanding.labels(b.name).set(w.outstanding)
            t0 = time.monotonic()
            done = _Done(self, i, rr, t0)
            fwd = {"content-type": "application/json"}
            if "authorization" in headers:
                fwd["authorization"] = headers["authorization"]
            try:
                req = self._client.build_request("POST", b.url + path, content=raw, headers=fwd)
                resp = await self._client.send(req, stream=True)
            except httpx.HTTPError as e:
                last = f"{b.name}: {type(e).__name__}: {e}"
                done(None)
                self._failed(i, last, down=isinstance(e, httpx.ConnectError))
                continue
            if resp.status_code >= 500:
                text = (await resp.aread()).decode(errors="replace")[:500]
                await resp.aclose()
                last = f"{b.name} answered {resp.status_code}: {text}"
                done(resp.status_code)
                self._failed(i, last)
                continue
            if not stream or resp.status_code != 200:
                data = await resp.aread()
                await resp.aclose()
                done(resp.status_code)
                try:
                    return "json", resp.status_code, json.loads(data), b.name
                except ValueError:
                    self._failed(i, f"{b.name} answered garbage")
                    last = f"{b.name} answered something that is not JSON"
                    continue
            chunks = resp.aiter_raw()
            try:  # the first chunk decides: a stream that fails before it is retried elsewhere
                first = await chunks.__anext__()
            except (httpx.HTTPError, StopAsyncIteration) as e:
                await resp.aclose()
                last = f"{b.name}: the stream ended before its first chunk ({type(e).__name__})"
                done(599)
                self._failed(i, last)
                continue
            if first.startswith(ERROR_EVENT):  # the instance failed before its first token: no token is out yet
                await resp.aclose()
                last = f"{b.name}: {first[6:].decode(errors='replace').strip()[:300]}"
                done(599)
                self._failed(i, last)
                continue
            return "stream", first, self._relay(chunks, resp, done, i), b.name
        return ("json", *_error(502, f"the request failed on {len(tried)} instance(s); last error: {last}"), None)

    async def _relay(self, chunks, resp, done, i):
        status = 200
        try:
            async for c in chunks:
                if status == 200 and b'data: {"error"' in c:  # the instance failed mid-stream and said so
                    status = 500
                    self._failed(i, f"{self.backends[i].name}: {c.decode(errors='replace').strip()[:300]}")
                yield c
        except httpx.HTTPError as e:
            status = 599
            self._failed(i, f"{self.backends[i].name}: stream broke: {type(e).__name__}")
            err = {"error": {"message": f"instance {self.backends[i].name} failed mid-stream: {type(e).__name__}",
                             "type": "server_error", "param": None, "code": 502}}
            yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
        finally:
            await resp.aclose()
            done(status)

    # ---- the HTTP app ----
    def app(self):
        @asynccontextmanager
        async def lifespan(_app):
            await self.start()
            try:
                yield
            finally:
                await self.stop()

        app = FastAPI(title="rsd-runtime router", lifespan=lifespan)

        async def handle(request: Request, path: str):
            out = await self.proxy(path, await request.body(), request.headers)
            if out[0] == "json":
                _, status, body, inst = out
                return JSONResponse(body, status_code=status, headers={"x-rsd-instance": inst} if inst else None)
            _, first, rest, inst = out

            async def gen():
                yield first
                async for c in rest:
                    yield c
            return StreamingResponse(gen(), media_type="text/event-stream", headers={"x-rsd-instance": inst})

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await handle(request, "/v1/completions")

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await handle(request, "/v1/chat/completions")

        @app.get("/v1/models")
        async def models():
            seen, data = set(), []
            for b in self.backends:  # each model once, as the first instance serving it describes it
                for m in b.models:
                    if m["id"] not in seen:
                        seen.add(m["id"])
                        data.append(m)
            return {"object": "list", "data": data}

        @app.get("/health")
        async def health():
            status, body = self.health()
            return JSONResponse(body, status_code=status)

        @app.get("/metrics")
        async def metrics():
            await self._scrape()
            return Response(generate_latest(self.registry), media_type="text/plain; version=0.0.4; charset=utf-8")

        return app


class _Done:
    """Ends one dispatch exactly once: bookkeeping for the policy, the counters and the histogram."""

    __slots__ = ("router", "i", "rr", "t0", "fired")

    def __init__(self, router: Router, i: int, rr: RouteRequest, t0: float):
        self.router, self.i, self.rr, self.t0, self.fired = router, i, rr, t0, False

    def __call__(self, status: int | None) -> None:
        if self.fired:
            return
        self.fired = True
        r = self.router
        b, w = r.backends[self.i], r.workers[self.i]
        w.outstanding -= 1
        r.m_outstanding.labels(b.name).set(w.outstanding)
        r.policy.on_finish(self.rr, w)
        code = "error" if status is None else str(status)
        r.m_requests.labels(b.name, code).inc()
        if status == 200:
            w.served += 1
            r.m_latency.labels(b.name).observe(time.monotonic() - self.t0)


def serve_router(router: Router, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run a router until SIGINT/SIGTERM; SIGTERM exits with status 0, as ``rsd-launch serve`` does."""
    import signal

    import uvicorn

    def on_sigterm(signum, frame):  # uvicorn re-raises the signal it caught once it has shut down
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)

    uvicorn.run(router.app(), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
