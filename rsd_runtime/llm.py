"""The offline API in the shape vLLM users know.

    from rsd_runtime import LLM, SamplingParams
    llm = LLM(model="path/to/hf-model", tensor_parallel_size=4)
    for out in llm.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0)):
        print(out.text, out.metrics["ttft_s"], out.metrics["emu_ttft_s"])
    llm.close()
"""
from __future__ import annotations

from typing import Callable

from rsd_runtime.engine import LLMEngine
from rsd_runtime.outputs import RequestOutput, timing
from rsd_runtime.sampling import SamplingParams
from rsd_runtime.tokenizer import IncrementalDecoder


class LLM:
    def __init__(self, model: str | None = None, tensor_parallel_size: int = 1, **engine_kwargs):
        if model is None:
            from rsd_runtime.tiny_model import ensure_tiny_model

            model = str(ensure_tiny_model())
        self.engine = LLMEngine(model, tensor_parallel_size, **engine_kwargs)
        self.tokenizer = self.engine.tokenizer

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
                 on_token: Callable[[int, int, str], None] | None = None) -> list[RequestOutput]:
        """Generate for each prompt (text, or a list of token ids); outputs in prompt order.

        ``on_token(request_index, token_id, new_text)`` is called for every token as it is sampled.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        params = [p or SamplingParams() for p in params]
        engine = self.engine
        texts = [p if isinstance(p, str) else None for p in prompts]
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        seqs = [engine.add_request(i, p) for i, p in zip(ids, params)]
        index = {s.seq_id: n for n, s in enumerate(seqs)}
        decoders = {s.seq_id: IncrementalDecoder(self.tokenizer) for s in seqs} if self.tokenizer else {}
        while engine.has_unfinished():
            for seq, token in engine.step():
                new = ""
                if seq.seq_id in decoders:
                    new = decoders[seq.seq_id].feed(token)
                    self._check_stop(seq, decoders[seq.seq_id])
                if on_token is not None:
                    on_token(index[seq.seq_id], token, new)
        outs = []
        for n, seq in enumerate(seqs):
            text = None
            if seq.seq_id in decoders:
                text = decoders[seq.seq_id].text
                for stop in seq.params.stop or ():
                    if stop in text:
                        text = text[:text.index(stop)]
            metrics = timing(engine.metrics.pop(seq.seq_id), len(seq.output_ids))
            outs.append(RequestOutput(n, texts[n], seq.prompt_ids, list(seq.output_ids), text, seq.finish_reason,
                                      metrics))
        return outs

    def _check_stop(self, seq, decoder) -> None:
        if seq.finish_reason is None and seq.params.stop and any(s in decoder.text for s in seq.params.stop):
            self.engine.scheduler.finish(seq, "stop")
