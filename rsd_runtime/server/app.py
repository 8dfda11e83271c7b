"""The OpenAI-compatible HTTP server of one instance: thin routes over ``AsyncLLM``.

    llm = AsyncLLM(model_dir, tensor_parallel_size=2)
    app = build_app(llm, "tiny-llama")        # then: uvicorn.run(app)

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or Server-Sent Events
ending ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` (200 only while the engine
thread runs and every card is alive; 503 otherwise, with the card states either way),
``GET /metrics`` (Prometheus text). The engine runs in AsyncLLM's thread; a route converts
the request, queues it and relays the deltas. Every error is an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from rsd_runtime.async_llm import AsyncLLM, EngineError, EngineStopped
from rsd_runtime.server.chat import ChatTemplate
from rsd_runtime.server.metrics import ServerMetrics
from rsd_runtime.server.protocol import APIError, ChatRequest, CompletionRequest, validation_error
from rsd_runtime.server.serving import Generation, error_event

LONG_TEXT_CHARS = 1 << 16  # a text prompt longer than this is tokenized off the event loop
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


class Server:
    """What the routes share: the engine client, the model's name and limits, the metrics."""

    def __init__(self, llm: AsyncLLM, model_name: str, model_dir: str | None = None):
        self.llm = llm
        self.model_name = model_name
        engine = llm.engine
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.cfg.vocab_size
        self.max_len = engine.max_len
        # a pool of experts serves each expert's name and its router's; one model serves model_name
        self.coe = hasattr(engine, "model_names")
        self.model_names = engine.model_names if self.coe else [model_name]
        self.chat = ChatTemplate.from_model_dir(model_dir, self.tokenizer) if (
            model_dir and self.tokenizer is not None) else (
            ChatTemplate(self.tokenizer) if self.tokenizer is not None else None)
        self.metrics = ServerMetrics(llm, model_name)
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False) \
                if self.tokenizer is not None else f"<{token_id}>"
        return text

    def check_model(self, name: str | None) -> str | None:
        """The model name to give the engine (None: its only model, or its router); 404 if unknown."""
        if name is not None and name not in self.model_names:
            raise APIError(404, f"model: the model {name!r} does not exist; this server serves "
                                f"{', '.join(map(repr, self.model_names))}", "model", "not_found_error")
        return name if self.coe else None

    def encode(self, prompt, param: str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, f"{param}: this model has no tokenizer; give token ids", param)
            return self.tokenizer.encode(prompt)
        return list(prompt)

    async def encode_async(self, prompt, param: str) -> list[int]:
        """``encode``, on a worker thread for a long text: the event loop keeps streaming to the others
        (a 4.8 MB prompt took 5.8 s to tokenize, and every stream stalled meanwhile)."""
        if isinstance(prompt, str) and len(prompt) > LONG_TEXT_CHARS:
            return await asyncio.to_thread(self.encode, prompt, param)
        return self.encode(prompt, param)


def build_app(llm: AsyncLLM, model_name: str, model_dir: str | None = None) -> FastAPI:
    server = Server(llm, model_name, model_dir)
    app = FastAPI(title="rsd-runtime", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):  # no such route, wrong method
        what = {404: f"no route {request.url.path}", 405: f"{request.url.path} does not take {request.method}"}
        err = APIError(exc.status_code, what.get(exc.status_code, str(exc.detail)), None,
                       "not_found_error" if exc.status_code == 404 else "invalid_request_error")
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health():
        report = llm.health()
        return JSONResponse(report, status_code=200 if report["ok"] else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": server.created, "owned_by": "rsd-runtime",
            "root": model_dir if not server.coe else None, "max_model_len": server.max_len,
            "vocab_size": server.vocab_size} for name in server.model_names]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):
        server.check_model(name)
        return next(m for m in (await models())["data"] if m["id"] == name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        model = server.check_model(body.model)
        prompts = [await server.encode_async(p, "prompt") for p in body.prompts()]
        return await _run(request, Generation(server, body, prompts, chat=False, model=model))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatRequest)
        model = server.check_model(body.model)
        if server.chat is None:
            raise APIError(400, "messages: this model has no tokenizer, so it cannot chat; use /v1/completions "
                                "with token ids", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            if sum(len(m["content"] or "") for m in messages) > LONG_TEXT_CHARS:  # off the event loop
                ids = await asyncio.to_thread(server.chat.encode, messages, body.add_generation_prompt)
            else:
                ids = server.chat.encode(messages, body.add_generation_prompt)
        except ValueError as exc:
            raise APIError(400, str(exc), "messages") from None
        return await _run(request, Generation(server, body, [ids], chat=True, model=model))

    return app


async def _parse(request: Request, model):
    try:
        raw = await request.body()
    except ClientDisconnect:  # gone before its body arrived: no one to answer, nothing to log
        raise APIError(400, "request: the client disconnected before sending its whole body") from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def _run(request: Request, gen: Generation):
    gen.start()
    if gen.body.stream:
        return EventStream(gen)
    collect = asyncio.ensure_future(_collect(gen))
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():  # the client left (or the server stops): stop its requests, free their blocks
            collect.cancel()
            gen.close()
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)  # nobody reads it
    return collect.result()


async def _collect(gen: Generation):
    outs: dict[int, list] = {}
    try:
        async for choice, out in gen.deltas():
            outs.setdefault(choice.index, []).append(out)
    except (EngineError, EngineStopped) as exc:
        err = APIError(500, f"the request failed: {exc}", None, "server_error")
        return JSONResponse(err.body(), status_code=500)
    finally:
        gen.close()
    return JSONResponse(gen.response(outs))


class EventStream(Response):
    """Server-Sent Events of one generation, written straight to the ASGI server.

    One ``send`` per event and no task group per chunk: at one event per token per stream, the
    per-event cost is what the API layer adds to every step. A task waits for the client's
    disconnect and cancels the writer, whose ``finally`` aborts the requests and frees their
    KV blocks."""

    def __init__(self, gen: Generation):
        self.gen = gen
        self.status_code = 200
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        gen = self.gen
        body = scope.get(RAW_SEND, send)  # chunks past the middlewares, which only look at the start
        writer = asyncio.current_task()
        watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, writer))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            include_usage = gen.body.stream_options is not None and gen.body.stream_options.include_usage

            def event(choice, out) -> dict:
                return {"type": "http.response.body", "body": gen.chunk(choice, out).encode(), "more_body": True}

            try:
                if len(gen.streams) == 1:  # one choice: its stream is read here, with no generator between
                    choice, stream = gen.choices[0], gen.streams[0]
                    async for out in stream:
                        await body(event(choice, gen.account(choice, out)))
                else:
                    async for choice, out in gen.deltas():
                        await body(event(choice, out))
                last = gen.usage_chunk() if include_usage else ""
            except (EngineError, EngineStopped) as exc:
                last = error_event(APIError(500, f"the request failed: {exc}", None, "server_error"))
            finally:  # also when the client disconnects: the writer is cancelled here
                gen.close()
            watcher.cancel()
            await send({"type": "http.response.body", "body": (last + "data: [DONE]\n\n").encode(),
                        "more_body": False})
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled():
                raise  # cancelled from outside (the server stops), not by the client's disconnect
            writer.uncancel()  # the client left: nothing more to send
        finally:
            watcher.cancel()


RAW_SEND = "rsd.raw_send"


def with_raw_send(app):
    """The ASGI app as the server runs it: the server's own ``send`` rides in the scope, so that an
    event stream writes its chunks without a pass through every middleware's wrapper per token."""
    async def asgi(scope, receive, send):
        if scope["type"] == "http":
            scope[RAW_SEND] = send
        await app(scope, receive, send)

    return asgi


async def _cancel_on_disconnect(receive, writer: asyncio.Task) -> None:
    await _disconnected(receive)
    writer.cancel()


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def default_model_name(model: str | None) -> str:
    return Path(model).name if model else "tiny-llama"
