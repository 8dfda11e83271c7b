"""Request bodies of the OpenAI API as pydantic models, and the error body every failure returns.

Models are strict: a string where a number belongs is refused, not converted, and the
error names the field (``param``). Unknown fields are accepted and ignored, as vLLM does,
so that clients sending newer OpenAI fields still work.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_N = 16  # choices per request at most; each is a request in the batch

Role = Literal["system", "developer", "user", "assistant", "tool"]
TokenIds = list[Annotated[int, Field(ge=0)]]


class APIError(Exception):
    """Turned into an OpenAI-style error response by the app."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = -1
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: allowed only when stream is true")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s for s in stops):
            raise ValueError("stop: stop strings must not be empty")
        if len(stops) > 4:  # as OpenAI allows
            raise ValueError(f"stop: at most 4 stop strings, got {len(stops)}")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False

    @model_validator(mode="after")
    def _check_prompt(self):
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: the list of prompts is empty")
        if self.echo:
            raise ValueError("echo: not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Role
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        return self


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_error(exc: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field."""
    err = exc.errors(include_url=False)[0]
    loc = []
    for part in err["loc"]:  # union members and validators show up in loc as type names: stop there
        if isinstance(part, str) and (part in _TYPE_NAMES or not part.isidentifier()):
            break
        loc.append(str(part))
    if err["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {err['msg']}", None)
    msg = err["msg"]
    param = ".".join(loc) or None
    if msg.startswith("Value error, "):  # our own checks say "field: problem"
        msg = msg[len("Value error, "):]
        field, _, rest = msg.partition(": ")
        if rest:
            param = field
    if err["type"] == "missing":
        return APIError(400, f"{param}: this field is required", param)
    return APIError(400, f"{param}: {msg}" if param and not msg.startswith(param) else msg, param)
