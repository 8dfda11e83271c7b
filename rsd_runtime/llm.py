"""The offline API in the shape vLLM users know.

    from rsd_runtime import LLM, SamplingParams
    with LLM(tensor_parallel_size=4) as llm:            # the built-in tiny model; model="path" for yours
        for out in llm.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0)):
            print(out.text, out.metrics["ttft_s"], out.metrics["emu_ttft_s"])
"""
from __future__ import annotations

import itertools
from typing import Callable

from rsd_runtime.engine import LLMEngine
from rsd_runtime.outputs import RequestOutput
from rsd_runtime.sampling import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, tensor_parallel_size: int = 1, *,
                 models: dict[str, str] | None = None, **engine_kwargs):
        """``models={"name": path_or_preset, ...}``: many models share the cards (a Composition of
        Experts, ``rsd_runtime.coe_engine``; ``router=`` a TOML file); ``generate(..., model=name)``."""
        if models is not None:
            if model is not None:
                raise ValueError("give model= or models=, not both")
            from rsd_runtime.coe_engine import CoEEngine

            self.engine = CoEEngine(models, tensor_parallel_size, **engine_kwargs)
            self.tokenizer = self.engine.tokenizer
            self._ids = itertools.count()
            return
        if model is None:
            from rsd_runtime.tiny_model import ensure_tiny_model

            model = str(ensure_tiny_model())
        self.engine = LLMEngine(model, tensor_parallel_size, **engine_kwargs)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.engine.close()

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: give token ids instead of text")
        return self.tokenizer.encode(prompt)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 on_token: Callable[[int, int, str], None] | None = None,
                 model: str | list[str] | None = None) -> list[RequestOutput]:
        """Generate for each prompt (text, or a list of token ids); outputs in prompt order.

        ``model``: with ``LLM(models=...)``, the model of every prompt (or a list, one per prompt): an
        expert's name or the router's.

        ``on_token(prompt_index, token_id, new_text)`` is called for every token as it is sampled;
        ``new_text`` is the text that token releases (text that could still become a stop string
        is held back until it cannot). Every prompt is checked before any runs: one bad prompt
        raises and leaves nothing queued.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        params = [p or SamplingParams() for p in params]
        names = model if isinstance(model, list) else [model] * len(prompts)
        if len(names) != len(prompts):
            raise ValueError(f"{len(names)} models for {len(prompts)} prompts")
        which = [{} if m is None else {"model": m} for m in names]
        engine = self.engine
        for prompt, p, m in zip(prompts, params, which):
            engine.validate(prompt, p, **m)
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        index = {rid: n for n, rid in enumerate(ids)}
        results: dict[str, RequestOutput] = {}
        try:
            for rid, prompt, p, m in zip(ids, prompts, params, which):
                engine.add_request(rid, prompt, p, **m)
            while any(rid in engine.requests for rid in ids):
                for delta in engine.step():  # one new token per delta
                    if delta.request_id in results:
                        results[delta.request_id].merge(delta)
                    else:
                        results[delta.request_id] = delta
                    if on_token is not None:
                        on_token(index[delta.request_id], delta.token_ids[-1], delta.text or "")
        finally:
            for rid in ids:  # an error (or Ctrl-C) leaves none of this call's requests queued
                engine.abort_request(rid)
        outs = []
        for n, rid in enumerate(ids):
            out = results[rid]
            out.request_id = n
            outs.append(out)
        return outs

