"""The OpenAI request schemas the server accepts, twotower's dial as extra body fields, and
their translation into ``DecodingSettings`` by the one rule every front end uses
(``resolve_settings``). Fields OpenAI defines that we cannot honour (``n > 1``, ``echo``,
tools, penalties, logprobs from a strategy that has none) are refused with a clear message,
never silently ignored; unknown fields are refused too (a misspelt dial option would otherwise
decode with the wrong settings)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import UsageError
from ..generate.settings import DecodingSettings, resolve_settings
from .logprobs import MAX_TOP_CHAT, MAX_TOP_COMPLETION

MAX_STOP_STRINGS = 4  # as OpenAI's API allows


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class DialFields(BaseModel):
    """twotower's decoding options, as extra body fields (the openai client's ``extra_body``)."""

    strategy: str | None = None  # a registered strategy's name: sets mode, verify and fused
    mode: str | None = None
    block_size: Annotated[int, Field(ge=1)] | None = None
    steps_per_block: Annotated[int, Field(ge=1)] | None = None
    confidence_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    commit_rule: str | None = None
    verify: bool | None = None
    fused: bool | None = None
    tree_nodes: Annotated[int, Field(ge=0)] | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None
    show_steps: bool = False  # stream twotower.step / twotower.commit events (the live view)


class Common(DialFields):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=0)] | None = None
    stop: str | list[str] | None = None
    n: Literal[1] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Literal[0, 0.0] | None = None  # accepted only as the no-op they default to
    frequency_penalty: Literal[0, 0.0] | None = None
    user: str | None = None  # an end user's id: accepted, not used

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return value

    def limit(self) -> int | None:
        return self.max_tokens

    def top_logprobs_count(self) -> int | None:
        """None: no logprobs; else how many likeliest alternatives each token's entry lists."""
        return None


class CompletionRequest(Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    # the AR model's logprob of each token and of this many likeliest alternatives (serve/logprobs.py)
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_COMPLETION)] | None = None
    echo: Literal[False] = False
    suffix: Literal[None] = None
    best_of: Literal[1] | None = None

    def prompt_value(self) -> str | list[int]:
        """The one prompt: a text or token ids (n = 1, so a list holds exactly one)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise UsageError("prompt: one prompt per request (a list of several is not supported)")
            p = p[0]
        if isinstance(p, list) and not p:
            raise UsageError("prompt: the prompt is empty")
        return p

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class ChatCompletionRequest(Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None  # the AR model's logprob of each token (serve/logprobs.py)
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_CHAT)] | None = None
    tools: Literal[None] = None
    tool_choice: Literal["none"] | None = None
    response_format: dict | None = None

    @field_validator("response_format")
    @classmethod
    def _format(cls, value):
        if value is not None and value != {"type": "text"}:
            raise ValueError("only {\"type\": \"text\"} is supported")
        return value

    def limit(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise UsageError("max_tokens and max_completion_tokens differ: give one")
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise UsageError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict]:
        return [m.as_template_message() for m in self.messages]


DIAL = ("mode", "block_size", "steps_per_block", "confidence_threshold", "commit_rule", "verify", "fused", "tree_nodes",
        "top_k")


def settings_for(request: Common, recommended: dict, default_max_tokens: int) -> DecodingSettings:
    """A request's decoding settings: the model's recommended preset unless the request gives
    the dial (``resolve_settings``' rule); greedy unless it gives a temperature."""
    stops = request.stop
    stop_strings = () if stops is None else (stops,) if isinstance(stops, str) else tuple(stops)
    given = {k: getattr(request, k) for k in DIAL}
    temperature = request.temperature
    return resolve_settings(
        recommended, strategy=request.strategy, max_new_tokens=request.limit() or default_max_tokens,
        temperature=temperature, top_p=request.top_p, seed=request.seed, stop_strings=stop_strings, **given,
    )
