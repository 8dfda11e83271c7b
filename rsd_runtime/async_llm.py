"""The engine behind many callers: one thread steps it, each caller gets its own stream of outputs.

    llm = AsyncLLM(tensor_parallel_size=2)            # built-in tiny model
    async for out in llm.generate("Hello", SamplingParams(max_tokens=8)):
        print(out.token_ids, out.text)                 # deltas; the last has finished=True
    llm.close()

Requests from every caller join the same continuous batch. The engine thread
owns the engine: callers only put commands in its inbox (add, abort) and read
their own queue, so nothing of the engine is touched from two threads. A
caller that stops reading (a client that disconnects) aborts its request and
its KV blocks are freed at the next step.

If a step fails (a dead or hung card), every request in flight ends with an
``EngineError``; with ``restart_cards=True`` the engine then restarts the dead
cards and takes work again (``LLMEngine.recover``; requests that arrive
meanwhile wait for it), otherwise it refuses new
requests until ``recover()`` is called.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

from rsd_runtime.engine import EngineDeadError, LLMEngine
from rsd_runtime.outputs import RequestOutput
from rsd_runtime.sampling import SamplingParams

log = logging.getLogger("rsd.async")
IDLE_WAIT_S = 0.05  # how often an idle engine thread looks at its cards


class EngineError(RuntimeError):
    """The request ended because the cards failed; the message says how."""


class Overloaded(RuntimeError):
    """The waiting queue is full: the request was refused at once."""


class EngineStopped(RuntimeError):
    """The engine is shutting down or down."""


class _Stream:
    """One request's outputs, read by its caller's event loop.

    A mailbox of one reader: the loop's thread appends and wakes the reader's future if it waits
    (an ``asyncio.Queue`` does the same with more steps, once per token per stream)."""

    __slots__ = ("loop", "items", "waiter", "finished", "held", "started")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.waiter, self.finished = loop, deque(), None, False
        self.held: RequestOutput | None = None  # deltas merged until the stream interval is reached
        self.started = False  # its first delta went out

    def put(self, item) -> None:
        """In the loop's thread."""
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self):
        while not self.items:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.popleft()


class AsyncLLM:
    def __init__(self, model: str | None = None, tensor_parallel_size: int = 1, *, restart_cards: bool = False,
                 max_waiting: int | None = None, stream_interval: int = 1, engine: LLMEngine | None = None,
                 **engine_kwargs):
        """``stream_interval``: a request's deltas go out every that many tokens (the first token and
        the end at once), merged in between: fewer wake-ups and events per token for a busy host."""
        if type(stream_interval) is not int or stream_interval < 1:
            raise ValueError(f"stream_interval must be an integer >= 1, got {stream_interval!r}")
        if engine is None:
            if model is None:
                from rsd_runtime.tiny_model import ensure_tiny_model

                model = str(ensure_tiny_model())
            engine = LLMEngine(model, tensor_parallel_size, **engine_kwargs)
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.restart_cards = restart_cards
        self.max_waiting = max_waiting
        self.stream_interval = stream_interval
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict = {}  # engine thread only
        self._held: list[RequestOutput] = []  # the last step's outputs, until the next plan is sent (engine thread)
        self._queued = 0  # requests added but not yet running (inbox + engine waiting); approximate
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.error: Exception | None = None  # why the engine thread ended, if it did
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="rsd-engine", daemon=True)
        self._thread.start()

    # -- callers (any thread, any event loop) -------------------------------------------------
    async def generate(self, prompt, params: SamplingParams | None = None, request_id=None, *,
                       arrival_time: float | None = None, model: str | None = None) -> AsyncIterator[RequestOutput]:
        """Deltas of one request; raises ValueError at once if the request is invalid,
        ``Overloaded`` if the waiting queue is full, ``EngineError`` if the cards fail under it.
        ``model``: the model of an engine that serves several (``CoEEngine``)."""
        stream = self.add_request(prompt, params, request_id, arrival_time=arrival_time, model=model)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def add_request(self, prompt, params: SamplingParams | None = None, request_id=None, *,
                    arrival_time: float | None = None, model: str | None = None) -> "RequestStream":
        """Queue a request now (from a running event loop) and return its stream of deltas.

        Raises at once, before anything is queued: ValueError or TypeError if the request is
        invalid, ``Overloaded`` if the waiting queue is full, ``EngineStopped`` / ``EngineError``
        if the engine cannot take work. Close the stream (or read it to the end) when done:
        closing it early aborts the request."""
        params = params or SamplingParams()
        self.check_ready()
        which = {} if model is None else {"model": model}
        self.engine.validate(prompt, params, **which)
        if self.max_waiting is not None and self._queued >= self.max_waiting:
            raise Overloaded(f"{self._queued} requests are waiting (--max-waiting {self.max_waiting})")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop())
        self._queued += 1
        self._inbox.put(("add", rid, prompt, params, stream, arrival_time or time.perf_counter(), which))
        self._wake.set()
        return RequestStream(self, rid, stream)

    def num_inbox(self) -> int:
        """Commands sent to the engine thread that it has not taken yet."""
        return self._inbox.qsize()

    def abort(self, request_id) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def check_ready(self) -> None:
        if self._stop.is_set() or not self._thread.is_alive():
            raise EngineStopped(f"the engine is not running{f': {self.error}' if self.error else ''}")
        if self.engine.dead is not None and not self.restart_cards:
            raise EngineError(f"the engine is down: {self.engine.dead}")

    def health(self) -> dict:
        """Whether the engine can serve: its thread runs, no step failed unrecovered, every card is alive."""
        engine, cluster = self.engine, self.engine.cluster
        # the control thread adds dead cards and the engine thread restarts them while we read: copy first
        control = getattr(cluster, "control", None)
        dead_now = dict(control.dead) if control is not None else {}
        procs = dict(cluster.procs) if cluster is not None else {}
        dead = {c: str(e).splitlines()[0] for c, e in dead_now.items() if c in engine.cards}
        alive = self._thread.is_alive() and not self._stop.is_set()
        engine_dead = engine.dead
        ok = alive and engine_dead is None and not dead
        why = engine_dead if engine_dead is not None else self.error  # a failed step, or the thread's end
        return {"ok": ok, "engine_thread": alive, "engine_error": None if why is None
                else str(why).splitlines()[0], "dead_cards": dead,
                "cards_restarted": engine.stats.cards_restarted, "recoveries": engine.stats.recoveries,
                "malformed": cluster.malformed() if cluster is not None else {},
                "cards": [{"card": c, "pid": procs[c].pid if c in procs else None,
                           "alive": c not in dead} for c in engine.cards]}

    def recover(self) -> None:
        """Ask the engine thread to restart dead cards and resynchronise (it does this itself with
        ``restart_cards``)."""
        done = threading.Event()
        self._inbox.put(("recover", done))
        self._wake.set()
        done.wait(120)

    def close(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._wake.set()
            self._thread.join(30)
        self.engine.close()

    def __enter__(self) -> "AsyncLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                if engine.dead is None and self._card_died():
                    engine.dead = next(iter(engine.cluster.control.dead.values()))
                if engine.dead is not None:
                    self._flush()
                    self._deliver(engine.fail_all(f"the cards failed: {str(engine.dead).splitlines()[0]}"))
                    # requests that came in meanwhile wait in the inbox for the recovery, unless it fails
                    if self.restart_cards and self._recover():
                        continue
                    self._drain_inbox()
                    self._wait()
                    continue
                self._drain_inbox()
                if not engine.has_unfinished():
                    self._flush()
                    self._wait()
                    continue
                try:
                    outs = engine.step(on_sent=self._flush)
                except EngineDeadError:
                    continue  # failed above on the next turn, with every request in flight
                finally:
                    self._flush()  # when no plan went out (nothing could be scheduled, or the step failed)
                self._queued = engine.num_waiting() + self._inbox.qsize()
                self._held = outs  # handed out while the cards run the next step, or when the engine idles
        except BaseException as exc:  # the thread must not die silently: callers would wait forever
            self.error = exc
            log.exception("engine thread failed")
            self._stop.set()
            for stream in self._streams.values():
                self._put(stream, EngineStopped(f"the engine thread failed: {exc}"))

    def _wait(self) -> None:
        self._wake.wait(IDLE_WAIT_S)
        self._wake.clear()

    def _card_died(self) -> bool:
        dead = self.engine.cluster.control.dead
        return bool(dead) and any(c in dead for c in self.engine.cards)

    def _recover(self) -> bool:
        try:
            self.engine.recover()
            log.warning("recovered: cards restarted and back in step")
            return True
        except Exception as exc:
            log.error("recovery failed: %s", exc)
            return False

    def _drain_inbox(self) -> None:
        engine = self.engine
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, params, stream, arrival, which = cmd
                try:
                    engine.add_request(rid, prompt, params, arrival_time=arrival, **which)
                    self._streams[rid] = stream
                except Exception as exc:
                    self._put(stream, exc if isinstance(exc, (ValueError, TypeError)) else EngineError(str(exc)))
            elif cmd[0] == "abort":
                if engine.abort_request(cmd[1]):
                    self._streams.pop(cmd[1], None)
            elif cmd[0] == "recover":
                self._flush()
                try:
                    self._deliver(engine.recover())
                finally:
                    cmd[1].set()
            self._queued = max(0, self._queued - (cmd[0] == "add"))

    def _flush(self) -> None:
        """Hand out the outputs held back from the last step."""
        if self._held:
            outs, self._held = self._held, []
            self._deliver(outs)

    def _deliver(self, outs: list[RequestOutput]) -> None:
        by_loop: dict = {}
        interval = self.stream_interval
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if stream.held is not None:  # merge into what waits for the interval
                stream.held.merge(out)
                if not out.finished and len(stream.held.token_ids) < interval:
                    continue
                out, stream.held = stream.held, None
            elif interval > 1 and stream.started and not out.finished and len(out.token_ids) < interval:
                stream.held = out
                continue
            stream.started = True
            if out.finished:
                del self._streams[out.request_id]
                stream.finished = True
                if out.finish_reason == "error":
                    by_loop.setdefault(stream.loop, []).append((stream, EngineError(out.error or "the cards failed")))
                    continue
            by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():  # one wake-up per event loop per step, not one per token
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: its callers are gone
                pass

    @staticmethod
    def _put(stream: _Stream, item) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.put, item)
        except RuntimeError:
            pass


class RequestStream:
    """One request's deltas as an async iterator; ``close()`` before the end aborts the request."""

    __slots__ = ("llm", "request_id", "_stream", "done")

    def __init__(self, llm: AsyncLLM, request_id, stream: _Stream):
        self.llm, self.request_id, self._stream, self.done = llm, request_id, stream, False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        stream = self._stream
        out = stream.items.popleft() if stream.items else await stream.get()
        if isinstance(out, BaseException):
            self.done = True
            raise out
        if out.finished:
            self.done = True
        return out

    def close(self) -> None:
        if not self.done and not self._stream.finished:
            self.llm.abort(self.request_id)
        self.done = True


def _put_all(items) -> None:
    for stream, item in items:
        stream.put(item)
