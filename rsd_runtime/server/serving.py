"""From an API request to engine requests, and from engine deltas to OpenAI response bodies.

One ``Generation`` is one HTTP request: its prompts times ``n`` choices, each an engine
request in the shared continuous batch. Choice ``i`` of prompt ``p`` has index
``p * n + i``; with a ``seed``, choice ``i`` samples with ``seed + i`` so that the choices
differ and the request repeats. Text arrives as the engine releases it (held back while a
stop string may be forming), one delta per step.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from rsd_runtime.async_llm import EngineError, EngineStopped, Overloaded
from rsd_runtime.sampling import SamplingParams
from rsd_runtime.sampling_params import MAX_SEED, MIN_SEED
from rsd_runtime.server.protocol import APIError, ChatRequest, CompletionRequest

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort", "error": "error"}
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class Choice:
    """What one choice has produced so far."""

    __slots__ = ("index", "text", "num_tokens", "finish_reason", "timings", "logprobs", "last_time",
                 "last_emu_ns")

    def __init__(self, index: int):
        self.index, self.text, self.num_tokens = index, [], 0
        self.finish_reason, self.timings, self.logprobs = None, None, []
        self.last_time, self.last_emu_ns = None, None


class Generation:
    def __init__(self, server, body: CompletionRequest | ChatRequest, prompts: list[list[int]], chat: bool,
                 model: str | None = None):
        """``model``: the engine's model for a server of several (an expert or the router), else None."""
        self.server, self.body, self.chat = server, body, chat
        self.model = model
        self.model_name = model or server.model_name
        self.prompts = prompts
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices = [Choice(i) for i in range(len(prompts) * body.n)]
        self.streams = []
        self.num_logprobs = (body.top_logprobs or 0) if chat and body.logprobs else (
            None if chat else body.logprobs)
        self.arrival = time.perf_counter()
        self._frame = self._token_frame()

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    # -- to the engine --------------------------------------------------------------------------
    def params(self, prompt: list[int], choice: int) -> SamplingParams:
        b, server = self.body, self.server
        max_tokens = (b.max_completion_tokens or b.max_tokens) if self.chat else b.max_tokens
        room = server.max_len - len(prompt)
        if room < 1:
            raise APIError(400, f"prompt: the prompt has {len(prompt)} tokens; this model's context is "
                                f"{server.max_len} tokens and at least one must be left to generate", "prompt")
        if max_tokens is not None and max_tokens > room:
            name = "max_completion_tokens" if self.chat and b.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{name}: the prompt has {len(prompt)} tokens and this model's context "
                                f"{server.max_len}, so at most {room} tokens can be generated; asked for "
                                f"{max_tokens}", name)
        if b.seed is not None and choice and not MIN_SEED <= b.seed + choice <= MAX_SEED:
            raise APIError(400, f"seed: choice {choice} samples with seed + {choice}, which must stay in "
                                f"[-2**63, 2**64); got seed {b.seed} with n={b.n}", "seed")
        if max_tokens is None:
            max_tokens = room if self.chat else min(16, room)  # OpenAI's completions default: 16
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=b.temperature, top_k=b.top_k, top_p=b.top_p,
                                  seed=None if b.seed is None else b.seed + choice, stop=b.stop,
                                  ignore_eos=b.ignore_eos, logprobs=self.num_logprobs)
        except ValueError as exc:
            field = str(exc).split(" ", 1)[0]
            raise APIError(400, str(exc), field) from None

    def start(self) -> None:
        """Queue every choice now. Every choice is checked before any is queued, so a refused request
        leaves nothing behind (not even an abort in the metrics); on a later refusal (the waiting
        queue fills up half-way), what was queued is closed."""
        llm = self.server.llm
        which = {} if self.model is None else {"model": self.model}
        try:
            work = []
            for prompt in self.prompts:
                for i in range(self.body.n):
                    params = self.params(prompt, i)
                    llm.engine.validate(prompt, params, **which)
                    work.append((prompt, params))
            for prompt, params in work:
                self.streams.append(llm.add_request(prompt, params, arrival_time=self.arrival, model=self.model))
        except BaseException as exc:
            self.close()
            if isinstance(exc, Overloaded):
                raise APIError(503, str(exc), None, "server_overloaded") from None
            if isinstance(exc, (EngineStopped, EngineError)):
                raise APIError(503, str(exc), None, "server_unavailable") from None
            if isinstance(exc, (ValueError, TypeError)):
                raise APIError(400, str(exc), "messages" if self.chat else "prompt") from None
            raise

    def close(self) -> None:
        for s in self.streams:
            s.close()

    async def deltas(self):
        """(choice, delta) as the engine makes them, every choice merged; EngineError if the cards fail."""
        if len(self.streams) == 1:
            choice, stream = self.choices[0], self.streams[0]
            async for out in stream:
                yield choice, self.account(choice, out)
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice, stream):
            try:
                async for out in stream:
                    queue.put_nowait((choice, out))
            except BaseException as exc:  # noqa: BLE001 - handed to the reader
                queue.put_nowait((choice, exc))

        tasks = [asyncio.ensure_future(pump(c, s)) for c, s in zip(self.choices, self.streams)]
        try:
            left = len(tasks)
            while left:
                choice, out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finished:
                    left -= 1
                yield choice, self.account(choice, out)
        finally:
            for t in tasks:
                t.cancel()

    def account(self, choice: Choice, out):
        metrics = self.server.metrics
        if choice.last_time is not None and out.token_ids:
            n = len(out.token_ids)  # a delta of several tokens (--stream-interval): its gap, shared out
            wall, emu = (out.time - choice.last_time) / n, (out.emu_time_ns - choice.last_emu_ns) * 1e-9 / n
            for _ in range(n):
                metrics.observe_itl(wall, emu)
        choice.last_time, choice.last_emu_ns = out.time, out.emu_time_ns
        choice.num_tokens = out.num_output_tokens
        if out.finished:
            choice.finish_reason = FINISH.get(out.finish_reason, out.finish_reason)
            choice.timings = out.metrics
            metrics.observe_finished(out.metrics)
        return out

    # -- to the client ------------------------------------------------------------------------------
    def usage(self) -> dict:
        completion = sum(c.num_tokens for c in self.choices)
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.num_prompt_tokens + completion}

    def chunk(self, choice: Choice, out) -> str:
        """One SSE event for a delta."""
        finish = choice.finish_reason if out.finished else None
        text = out.text or ""
        if finish is None and (out.logprobs is None or self.num_logprobs is None) and not (
                self.chat and choice.num_tokens == len(out.token_ids)):
            # the common event (a token, no logprobs): the same bytes as below, from a prebuilt frame
            head, tail = self._frame
            return f"{head}{choice.index}{tail[0]}{_dumps(text)}{tail[1]}"
        if self.chat:
            delta = {"content": text}
            if choice.num_tokens == len(out.token_ids):  # the first delta of this choice
                delta["role"] = "assistant"
            c = {"index": choice.index, "delta": delta, "logprobs": self._chat_logprobs(out),
                 "finish_reason": finish}
        else:
            c = {"index": choice.index, "text": text, "logprobs": self._completion_logprobs(out),
                 "finish_reason": finish}
        if finish is not None:
            c["timings"] = choice.timings
        return self._event([c])

    def _token_frame(self) -> tuple[str, tuple[str, str]]:
        """The text around a token event's choice index and text, as ``_event`` would encode it."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        head = (f'data: {{"id":{_dumps(self.id)},"object":"{obj}","created":{self.created},'
                f'"model":{_dumps(self.model_name)},"choices":[{{"index":')
        tail = (',"delta":{"content":', '},"logprobs":null,"finish_reason":null}]}\n\n') if self.chat else (
            ',"text":', ',"logprobs":null,"finish_reason":null}]}\n\n')
        return head, tail

    def usage_chunk(self) -> str:
        return self._event([], usage=self.usage())

    def _event(self, choices: list, **extra) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return "data: " + _dumps({"id": self.id, "object": obj, "created": self.created,
                                  "model": self.model_name, "choices": choices, **extra}) + "\n\n"

    def response(self, outs: dict[int, list]) -> dict:
        """The whole body of a non-streaming response; ``outs``: choice index -> its deltas."""
        choices = []
        for choice in self.choices:
            deltas = outs.get(choice.index, [])
            text = "".join(d.text or "" for d in deltas)
            if self.chat:
                lps = [e for d in deltas for e in (self._chat_logprobs(d) or {"content": []})["content"]]
                c = {"index": choice.index, "message": {"role": "assistant", "content": text},
                     "logprobs": {"content": lps} if self.num_logprobs is not None else None,
                     "finish_reason": choice.finish_reason}
            else:
                c = {"index": choice.index, "text": text, "logprobs": self._merged_completion_logprobs(deltas),
                     "finish_reason": choice.finish_reason}
            c["timings"] = choice.timings
            choices.append(c)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name, "choices": choices,
                "usage": self.usage()}

    # -- logprobs -------------------------------------------------------------------------------
    def _chat_logprobs(self, out):
        if out.logprobs is None or self.num_logprobs is None:
            return None
        tok = self.server.token_text
        return {"content": [{"token": tok(lp.token_id), "logprob": lp.logprob,
                             "bytes": list(tok(lp.token_id).encode()),
                             "top_logprobs": [{"token": tok(t), "logprob": v, "bytes": list(tok(t).encode())}
                                              for t, v in lp.top]} for lp in out.logprobs]}

    def _completion_logprobs(self, out):
        if out.logprobs is None or self.num_logprobs is None:
            return None
        tok = self.server.token_text
        return {"tokens": [tok(lp.token_id) for lp in out.logprobs],
                "token_logprobs": [lp.logprob for lp in out.logprobs],
                "top_logprobs": [{tok(t): v for t, v in lp.top} for lp in out.logprobs]}

    def _merged_completion_logprobs(self, deltas):
        if self.num_logprobs is None:
            return None
        merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for d in deltas:
            part = self._completion_logprobs(d)
            if part is None:
                continue
            for key in ("tokens", "token_logprobs", "top_logprobs"):
                merged[key] += part[key]
            for t in part["tokens"]:
                merged["text_offset"].append(offset)
                offset += len(t)
        return merged


def error_event(exc: APIError) -> str:
    return "data: " + _dumps(exc.body()) + "\n\n"
