"""The benchmark's streaming client against real loopback servers: pieces in order with their times,
connections reused, and a broken or cut-short response named, never a hang."""
from __future__ import annotations

import asyncio

import pytest

from bench.sse_client import HTTPStreamError, Pool


async def _serve(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _read_request(reader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    return head + await reader.readexactly(length)


def test_chunks_arrive_in_order_and_the_connection_is_reused():
    connections = []

    async def handler(reader, writer):
        connections.append(writer)
        while True:
            try:
                request = await _read_request(reader)
            except asyncio.IncompleteReadError:
                break
            assert request.startswith(b"POST /v1/completions HTTP/1.1\r\n") and request.endswith(b'{"n": 3}')
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-rsd-instance: a\r\n\r\n")
            for i in range(3):
                piece = f"data: {i}\n\n".encode()
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
        writer.close()

    async def main():
        server, url = await _serve(handler)
        pool = Pool(url, limit=1)
        try:
            for _ in range(2):
                got = []
                status, headers = await pool.stream("/v1/completions", {"n": 3}, lambda b, t: got.append((b, t)))
                assert status == 200 and headers["x-rsd-instance"] == "a"
                assert b"".join(b for b, _ in got) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
                times = [t for _, t in got]
                assert times == sorted(times) and times[-1] - times[0] >= 0.015  # stamped as they came
        finally:
            pool.close()
            server.close()
        assert len(connections) == 1  # kept alive: the second request went over the first connection

    asyncio.run(main())


@pytest.mark.parametrize("reply,match", [
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\ndata:", "closed before the response ended"),
    (b"HTTQ/9 OK\r\n\r\n", "malformed HTTP response"),
])
def test_a_broken_or_cut_short_response_is_named(reply, match):
    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(reply)
        await writer.drain()
        writer.close()

    async def main():
        server, url = await _serve(handler)
        pool = Pool(url, limit=2)
        try:
            with pytest.raises(HTTPStreamError, match=match):
                await asyncio.wait_for(pool.stream("/x", {}, lambda b, t: None), 10)
            assert not pool.idle
        finally:
            pool.close()
            server.close()

    asyncio.run(main())


def test_only_plain_http_urls():
    with pytest.raises(ValueError, match="plain http"):
        Pool("https://127.0.0.1:8000", 1)
