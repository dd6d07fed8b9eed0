"""OpenAI-shaped request bodies and responses for the HTTP server, and their mapping to engine requests.

Field names follow OpenAI's Chat Completions and Completions APIs; unknown fields are refused (as OpenAI
does) so a typo never silently changes generation. Extensions: `top_k`, `repetition_penalty` and
`accelserve_policy` (pass them with the openai client's `extra_body`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from backends.base import GenerationRequest, SamplingParams, TokenLogprob
from plugin.engine.engine import ChatChunk, RequestMetrics
from plugin.engine.explain import placement_dict
from plugin.engine.scheduler import POLICIES

# Sent by common clients; they do not change what is generated, so they are accepted and ignored.
_IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key"}
# Features this server does not implement: refused unless left at their "off" value.
_UNSUPPORTED_FIELDS = {
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logit_bias",
    "frequency_penalty",
    "presence_penalty",
    "response_format",
    "echo",
    "suffix",
    "best_of",
    "modalities",
    "audio",
    "prediction",
    "reasoning_effort",
    "web_search_options",
}
_OFF_VALUES: tuple[Any, ...] = (None, False, 0, 0.0, "", [], {}, "none", {"type": "text"})
_HINTS = {
    "frequency_penalty": " Use the `repetition_penalty` extension instead.",
    "presence_penalty": " Use the `repetition_penalty` extension instead.",
}


class BadRequest(ValueError):
    """A request the server refuses with 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage so far in every chunk


class _GenerationBody(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)  # OpenAI's range
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    top_k: int | None = None
    repetition_penalty: float | None = None
    # vLLM's sampling extensions, as serving benchmarks (guidellm, vllm bench serve) send them
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    # chat: logprobs (bool) + top_logprobs (0-20); completions: logprobs (int, the number of alternatives)
    logprobs: bool | int | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    accelserve_policy: str | None = None

    def check(self) -> None:
        """Refuse what this server cannot honour, naming the field and the fix."""
        if self.n != 1:
            raise BadRequest(f"n={self.n} is not supported: this server returns exactly one choice; use n=1", "n")
        for name, value in (self.model_extra or {}).items():
            if name in _IGNORED_FIELDS:
                continue
            if name in _UNSUPPORTED_FIELDS:
                if any(value == off and type(value) is type(off) for off in _OFF_VALUES):
                    continue
                if name == "best_of" and value == 1:
                    continue
                raise BadRequest(
                    f"'{name}' is not supported by this server (got {value!r}).{_HINTS.get(name, '')}", name
                )
            raise BadRequest(f"Unrecognized request argument supplied: '{name}'", name)
        if self.accelserve_policy is not None and self.accelserve_policy not in POLICIES:
            raise BadRequest(
                f"accelserve_policy must be one of {list(POLICIES)} (got {self.accelserve_policy!r})",
                "accelserve_policy",
            )
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options is only allowed when stream is true", "stream_options")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        for i, text in enumerate(stops):
            check_text(text, f"stop[{i}]" if isinstance(self.stop, list) else "stop")

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_requested(self) -> int | None:
        """How many alternatives per token were asked for (None: no logprobs). Completions: `logprobs: N`."""
        if self.logprobs is None or self.logprobs is False:
            return None
        if self.logprobs is True:
            raise BadRequest("logprobs is a number of alternatives on /v1/completions (0-20), not true", "logprobs")
        return self.logprobs

    def sampling(self) -> SamplingParams:
        """SamplingParams from the OpenAI fields; invalid values raise ValueError (-> 400) with the reason."""
        kwargs: dict[str, Any] = {}
        max_new = self.max_new_tokens()
        if max_new is not None:
            kwargs["max_new_tokens"] = max_new
        for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "ignore_eos", "min_tokens"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        if self.stop is not None:
            kwargs["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if self.stop_token_ids is not None:
            kwargs["stop_token_ids"] = tuple(self.stop_token_ids)
        top = self.logprobs_requested()
        if top is not None:
            kwargs["logprobs"] = top
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:
            raise BadRequest(str(e)) from e


def check_text(text: str, param: str) -> str:
    """Refuse text that is not valid Unicode (JSON allows a lone surrogate escape such as \\ud800; no tokenizer
    does), naming the field, instead of failing inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(
            f"{param} is not valid Unicode: {e.reason} at character {e.start} (a lone UTF-16 surrogate escape?); "
            "send well-formed UTF-8 text",
            param,
        ) from None
    return text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `name`, which chat templates do not use
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        # OpenAI lets only an assistant message (one that called tools) go without content
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content' (a string or a list of text parts), got null")
        return self

    def text(self, index: int) -> str:
        param = f"messages[{index}].content"
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return check_text(self.content, param)
        parts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(
                    f"messages[{index}].content[{j}] has type {part.get('type')!r}: only text parts are supported",
                    f"messages[{index}].content",
                )
            parts.append(check_text(part["text"], f"{param}[{j}].text"))
        return "".join(parts)


class ChatCompletionBody(_GenerationBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_requested(self) -> int | None:
        """Chat: `logprobs: true` turns them on, `top_logprobs` (0-20) says how many alternatives."""
        if self.top_logprobs is not None and self.logprobs is not True:
            raise BadRequest("top_logprobs needs logprobs set to true", "top_logprobs")
        if self.logprobs is None or self.logprobs is False:
            return None
        if self.logprobs is not True:
            raise BadRequest(f"logprobs must be true or false on /v1/chat/completions (got {self.logprobs!r})")
        return self.top_logprobs or 0

    def to_request(self) -> GenerationRequest:
        self.check()
        if not self.messages:
            raise BadRequest("messages is empty: pass at least one message", "messages")
        # Chat templates know "system", not OpenAI's newer "developer" role for the same thing.
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
            for i, m in enumerate(self.messages)
        ]
        return GenerationRequest(messages=messages, sampling=self.sampling())


class CompletionBody(_GenerationBody):
    prompt: str | list[str]

    def to_request(self) -> GenerationRequest:
        self.check()
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise BadRequest(f"prompt must be one string; got a list of {len(prompt)} (batching is per request)")
            prompt = prompt[0]
        return GenerationRequest(prompt=check_text(prompt, "prompt"), sampling=self.sampling())


# ---- responses --------------------------------------------------------------------------------------


def openai_finish_reason(reason: str | None) -> str | None:
    """OpenAI clients know stop/length; a server-side cancel ends the text like a stop (the true reason is in
    `accelserve.finish_reason`)."""
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def usage(metrics: RequestMetrics) -> dict[str, int]:
    return {
        "prompt_tokens": metrics.prompt_tokens,
        "completion_tokens": metrics.new_tokens,
        "total_tokens": metrics.prompt_tokens + metrics.new_tokens,
    }


@dataclass
class ResponseShape:
    """Builds one endpoint's objects: `chat.completion(.chunk)` or `text_completion`."""

    kind: Literal["chat", "completion"]
    model: str
    request_id: str
    created: int = 0
    token_text: Callable[[int], str] | None = None  # id -> text, for logprobs

    def logprobs(self, entries: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
        """OpenAI's logprobs object for these tokens (None when the request did not ask for them)."""
        if entries is None or self.token_text is None:
            return None
        text = self.token_text
        if self.kind == "chat":

            def item(token_id: int, lp: float) -> dict[str, Any]:
                t = text(token_id)
                return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

            content = [
                {**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries
            ]
            return {"content": content, "refusal": None}
        tokens = [text(e.token_id) for e in entries]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text(i): lp for i, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def __post_init__(self) -> None:
        self.created = self.created or int(time.time())

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.request_id

    def full(self, text: str, last: ChatChunk, logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
        assert last.metrics is not None
        lp = self.logprobs(logprobs)
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp}
        choice["finish_reason"] = openai_finish_reason(last.finish_reason)
        return {
            "id": self.id,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [choice],
            "usage": usage(last.metrics),
            "accelserve": {**placement_dict(last.placement, last.metrics), "finish_reason": last.finish_reason},
        }

    def chunk(self, chunk: ChatChunk, first: bool, continuous_usage: bool = False) -> dict[str, Any]:
        finish = openai_finish_reason(chunk.finish_reason)
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if chunk.text or first:
                delta["content"] = chunk.text
            lp = self.logprobs(chunk.logprobs)
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            lp = self.logprobs(chunk.logprobs)
            choice = {"index": 0, "text": chunk.text, "logprobs": lp, "finish_reason": finish}
        extra = placement_dict(chunk.placement, chunk.metrics)
        if chunk.finish_reason is not None:
            extra["finish_reason"] = chunk.finish_reason
        out = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [choice],
            "accelserve": extra,
        }
        if continuous_usage:
            done = chunk.completion_tokens
            out["usage"] = {
                "prompt_tokens": chunk.prompt_tokens,
                "completion_tokens": done,
                "total_tokens": chunk.prompt_tokens + done,
            }
        return out

    def usage_chunk(self, metrics: RequestMetrics) -> dict[str, Any]:
        """The extra last chunk OpenAI sends when `stream_options.include_usage` is true."""
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [],
            "usage": usage(metrics),
        }
