"""The contract every runtime implements, and the request/chunk types all of them share.

A backend owns one loaded model on one device. The engine calls `generate` from a worker thread and
reads the chunks as they come; `cancel` may be called from any other thread and must make the stream
end (finish_reason "cancelled") within one decode step.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "cancelled", "error"]
MAX_SEED = 2**31 - 1
MAX_TOP_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this decode greedily on every backend (vLLM's rule): dividing logits by 1e-39 overflows
to inf and softmax turns that into NaN, while the limit of sampling as temperature -> 0 is the argmax."""


class BackendError(RuntimeError):
    """A backend could not load or serve; the message names the cause and the fix."""


class ContextOverflowError(BackendError, ValueError):
    """The prompt plus max_new_tokens does not fit the model's context window."""


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. greedy=True, or a temperature below GREEDY_TEMPERATURE (0 included), means greedy
    decoding on every backend (`is_greedy`)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    greedy: bool = False
    # vLLM's extensions, with vLLM's meaning (serving benchmarks such as guidellm send them)
    ignore_eos: bool = False  # keep generating past EOS, up to max_new_tokens
    min_tokens: int = 0  # no EOS, stop token or stop string ends the reply before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # token ids that end the reply like EOS (kept in the count)
    logprobs: int | None = None  # None: off; N: each generated token's log-probability and the N most likely

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1 (got {self.max_new_tokens!r})")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature!r}); use 0 for greedy")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0, 0 meaning off (got {self.top_k!r})")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, 1.0 meaning off (got {self.repetition_penalty!r})")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED):
            # onnxruntime-genai takes a 32-bit signed seed; a larger one must be a bad request, not a device failure
            problems.append(f"seed must be an integer from 0 to {MAX_SEED}, or None (got {self.seed!r})")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop strings must be non-empty strings (got {self.stop!r})")
        if not isinstance(self.ignore_eos, bool):
            problems.append(f"ignore_eos must be true or false (got {self.ignore_eos!r})")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            problems.append(f"min_tokens must be an integer >= 0 (got {self.min_tokens!r})")
        elif isinstance(self.max_new_tokens, int) and self.min_tokens > self.max_new_tokens:
            problems.append(f"min_tokens ({self.min_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})")
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= 20
        ):
            problems.append(f"logprobs must be None or an integer from 0 to {MAX_TOP_LOGPROBS} (got {self.logprobs!r})")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be non-negative integers (got {list(self.stop_token_ids)!r})")
        if problems:
            raise ValueError("Invalid sampling parameters: " + "; ".join(problems))

    @property
    def is_greedy(self) -> bool:
        """Greedy as asked, or a temperature so small that sampling would only overflow (GREEDY_TEMPERATURE)."""
        return self.greedy or self.temperature < GREEDY_TEMPERATURE

    def suppressed_until(self) -> int:
        """How many tokens must be generated before EOS may be sampled (max_new_tokens with ignore_eos)."""
        return self.max_new_tokens if self.ignore_eos else self.min_tokens

    def banned_ids(self, eos_ids: frozenset[int], generated: int) -> list[int]:
        """Tokens a row may not sample after `generated` tokens: EOS under ignore_eos, EOS and stop ids before
        min_tokens (vLLM's meaning; every batching runner asks this one rule)."""
        out = list(eos_ids) if generated < self.suppressed_until() else []
        return out + list(self.stop_token_ids) if generated < self.min_tokens else out


@dataclass
class GenerationRequest:
    """One generation: either chat `messages` (the model's chat template is applied) or a raw `prompt`.

    `prompt_ids`, when set, are those messages or that prompt already tokenized (the engine tokenizes once
    to place the request); backends then use them as they are.
    """

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    prompt_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("GenerationRequest needs exactly one of `messages` (chat) or `prompt` (raw text)")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("messages is empty: pass at least one {'role': ..., 'content': ...}")
            for i, m in enumerate(self.messages):
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content' (got {m!r})")


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model's raw distribution, and the most likely tokens."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass
class TokenChunk:
    """A piece of a streamed reply. The last chunk of a stream has finish_reason set."""

    request_id: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them


@dataclass(frozen=True)
class BackendCapabilities:
    name: str  # "onnxruntime-genai" | "torch"
    device: str  # "cpu" | "gpu" | "npu"
    provider: str  # what actually executes, e.g. "CPUExecutionProvider", "QNNExecutionProvider", "cuda:0"
    precision: str  # "int4" | "int8" | "fp16" | "bf16" | "fp32"
    max_batch_size: int
    context_length: int
    simulated: bool = False
    emulated: bool = False  # a vendor's own NPU compiler and runtime executing on the host CPU (QNN HTP on x86)
    # KV-cache budget left after the weights, for the engine's admission (None: the backend sets no bound)
    kv_budget_bytes: int | None = None
    kv_bytes_per_token: int = 0


@dataclass
class BackendHealth:
    healthy: bool
    active_requests: int = 0
    detail: str = ""
    # the device's context is unusable (e.g. an unrecoverable CUDA error): only a new process can use it again,
    # so the engine retires the device instead of reloading on it after a back-off
    restart_required: bool = False


@runtime_checkable
class Backend(Protocol):
    """One loaded model on one device."""

    def load(self) -> None: ...

    def generate(self, request: GenerationRequest) -> Iterator[TokenChunk]: ...

    def cancel(self, request_id: str) -> bool: ...

    def capabilities(self) -> BackendCapabilities: ...

    def health(self) -> BackendHealth: ...

    def unload(self) -> None: ...
