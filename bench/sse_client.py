"""A lean streaming HTTP client for the serving benchmark: asyncio's transports, httptools' parser.

    pool = Pool("http://127.0.0.1:8000", limit=16)
    status, headers = await pool.stream("/v1/completions", body, on_body)   # on_body(bytes, arrival time)
    pool.close()

Each body piece reaches ``on_body`` from the transport's ``data_received`` with the time it
arrived, without a coroutine step per piece: at one Server-Sent Event per token per stream,
the client shares the host's cores with the server it measures, and every microsecond it
spends per event is taken from the server (measured on 2 cores, tiny model, tp=2, 16 streams:
the benchmark's process took 22-29 ms of CPU per 1,000 streamed tokens, against 34-43 ms with
aiohttp's streaming reader). Connections are kept alive and reused, at most ``limit`` at once, as aiohttp's pool
does. Plain http only: the benchmark measures servers on this host or its network.
"""
from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit

import httptools


class HTTPStreamError(ConnectionError):
    """The connection failed or closed before the response ended."""


class _Response(asyncio.Protocol):
    """One keep-alive connection; one response at a time, parsed as it arrives."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.parser = None
        self.sink = None  # where the body goes: sink(piece, arrival time)
        self.done: asyncio.Future | None = None
        self.headers: dict[str, str] = {}
        self.status = 0
        self.keep_alive = True
        self.now = 0.0

    def begin(self, sink) -> asyncio.Future:
        self.sink, self.headers, self.status = sink, {}, 0
        self.parser = httptools.HttpResponseParser(self)
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    # -- transport callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.now = time.perf_counter()
        if self.parser is None:
            return  # bytes between responses: nothing is expected, the connection is not reused
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.keep_alive = False
            self._finish(HTTPStreamError(f"malformed HTTP response: {exc}"))
        except Exception as exc:  # noqa: BLE001 - an error in on_body ends this request, not the loop
            self.keep_alive = False
            self._finish(exc)

    def connection_lost(self, exc) -> None:
        self.keep_alive = False
        self._finish(HTTPStreamError(f"the connection closed before the response ended"
                                     f"{f': {exc}' if exc else ''}"))

    # -- parser callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.sink(body, self.now)

    def on_message_complete(self) -> None:
        self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        self.parser = None
        if self.done is not None and not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)


class Pool:
    def __init__(self, base_url: str, limit: int):
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"the benchmark's client speaks plain http://host:port; got {base_url!r}")
        self.host, self.port = url.hostname, url.port or 80
        self.prefix = url.path.rstrip("/")
        self.limit = asyncio.Semaphore(limit)
        self.idle: list[_Response] = []

    async def stream(self, path: str, body: dict, on_body, timeout: float = 600.0) -> tuple[int, dict]:
        """POST ``body`` as JSON to ``path``; ``on_body(piece, arrival)`` for each piece of the response
        body as it arrives. Returns the status and the headers (lower-case names) once the response
        ended; raises ``HTTPStreamError`` (or ``OSError`` on connect) if it could not end."""
        payload = json.dumps(body).encode()
        head = (f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
        async with self.limit:
            conn = await self._connection()
            done = conn.begin(on_body)
            conn.transport.write(head + payload)
            try:
                await asyncio.wait_for(done, timeout)
            except BaseException:
                conn.transport.close()  # a response cut short leaves the connection in no known state
                raise
            if conn.keep_alive and not conn.transport.is_closing():
                self.idle.append(conn)
            else:
                conn.transport.close()
            return conn.status, conn.headers

    async def _connection(self) -> _Response:
        while self.idle:
            conn = self.idle.pop()
            if not conn.transport.is_closing():
                return conn
        _, conn = await asyncio.get_running_loop().create_connection(_Response, self.host, self.port)
        return conn

    def close(self) -> None:
        for conn in self.idle:
            conn.transport.close()
        self.idle.clear()
