"""Chat messages -> prompt token ids: the checkpoint's chat template, or a plain fallback.

A checkpoint whose ``tokenizer_config.json`` has a ``chat_template`` is rendered as
transformers renders it (a sandboxed jinja2 environment with ``trim_blocks`` and
``lstrip_blocks``, the variables ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``, and the helpers ``raise_exception`` and ``strftime_now``); the text is then
tokenized without adding bos, since such templates write it themselves.

Without a template (the built-in tiny model), the fallback writes one line per message,
``"<role>: <content>\\n"``, then ``"assistant:"`` when a generation prompt is asked for,
and tokenizes that with bos in front, as a completion prompt would be.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from rsd_runtime.tokenizer import Tokenizer


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer, template: str | None = None, special: dict | None = None):
        self.tokenizer = tokenizer
        self.source = template
        self.special = special or {}
        self._compiled = None
        if template is not None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._compiled = env.from_string(template)
            except TemplateError as exc:
                raise ValueError(f"the chat template in tokenizer_config.json does not compile: {exc}") from None

    @classmethod
    def from_model_dir(cls, folder, tokenizer: Tokenizer) -> "ChatTemplate":
        config = Path(folder) / "tokenizer_config.json"
        template, special = None, {}
        if config.is_file():
            data = json.loads(config.read_text(encoding="utf-8"))
            template = data.get("chat_template")
            if isinstance(template, list):  # named templates: transformers picks "default"
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                tok = data.get(key)
                special[key] = tok.get("content") if isinstance(tok, dict) else tok
        return cls(tokenizer, template, special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._compiled is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant:" if add_generation_prompt else "")
        from jinja2.exceptions import TemplateError

        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{k: v for k, v in self.special.items() if v is not None})
        except TemplateError as exc:
            raise ValueError(f"messages: the chat template refused them: {exc}") from None

    def encode(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.tokenizer.encode(self.render(messages, add_generation_prompt),
                                     add_bos=self._compiled is None)


def _raise(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)
