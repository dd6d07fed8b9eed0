"""onnxruntime-genai backend: the NPU path (QNN / OpenVINO / VitisAI / DirectML), with CPU as the floor.

One loaded `og.Model` serves up to `max_batch_size` requests at once, each on its own `og.Generator`
driven by the caller's thread (onnxruntime sessions are thread-safe for Run, and onnxruntime-genai
releases the GIL while it computes). Requests beyond that wait for a slot and can be cancelled while they
wait.

Why per-request generators and not og.Engine or batched GeneratorParams. Measured on this project's
2-core CPU machine (shared with other work, so +-10%), SmolLM2-135M-Instruct, greedy, 128 new tokens.

`python benchmarks/bench_ort_overhead.py --compare-engine` on the default npu/int4 export (aggregate
tokens/s over all streams, prefill included):

    strategy                    1 stream   4 streams   4 streams' text == sequential greedy
    per-request Generators         97          95       yes (tested)
    og.Engine                      96          89       1 of 4 (one request failed in onnxruntime)

An earlier hand-made int4 export of the same model (decode only): Generators 113 / 73-107 (4 streams,
default / 1 intra-op thread), og.Engine 112 / 221, batched GeneratorParams 104 / 221.

Batching the decode step can double aggregate throughput, but on the plain Optimum graph both og.Engine
and batched GeneratorParams give WRONG text for requests shorter than the longest in the batch:
onnxruntime-genai 0.18 feeds left padding as real tokens (attention_mask all ones, seen with its input
logging), so a padded request attends to pad tokens and its first token already differs; og.Engine also
fails some requests with a present-KV shape mismatch. It refuses per-turn seeds and stop strings too
unless the model has a paged KV cache ("requires an Engine configured for dynamic batching"). Correct
text and per-request seeds win, so each request runs on its own generator: four streams share the cores
(aggregate ~ one stream) instead of sharing a batched step. Revisit with a paged-attention export.

Overhead over a bare `og.Generator` streaming loop on the same model (benchmarks/bench_ort_overhead.py,
11 alternating pairs, default export): decode 99.7 vs 100.2 tokens/s, +0.5% (ratio of medians), +0.1%
(median of pairs); the per-token Python cost is ~3 us (2.6% of a 0.1 ms tiny-model token). Creating an
og.Generator costs ~25 ms per request here, in the bare loop as well (part of time to first token).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from backends.base import (
    BackendCapabilities,
    BackendError,
    BackendHealth,
    ContextOverflowError,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)
from backends.ort_detok import Detokenizer, StreamDecoder
from backends.ort_providers import ProviderSpec, load_with_fallback, preference_for
from backends.ort_template import ChatTemplate, load_chat_template
from backends.textstream import StopStringMatcher

log = logging.getLogger(__name__)

BACKEND_NAME = "onnxruntime-genai"
_WAIT_POLL_S = 0.05  # how often a queued request re-checks its cancel flag while waiting for a slot


def read_genai_config(model_dir: Path) -> dict[str, Any]:
    """genai_config.json of an exported folder, with a clear error when the folder is not an export."""
    path = model_dir / "genai_config.json"
    if not path.is_file():
        raise BackendError(
            f"{model_dir} has no genai_config.json: it is not an onnxruntime-genai export. "
            "Fix: export it first, e.g. plugin.export.export(model, target='npu', precision='int4')"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BackendError(f"{path} is not valid JSON ({exc}); re-export the model with force=True") from exc


def detect_precision(model_dir: Path) -> str:
    """The export's precision: from its manifest when present, else from the graph's weight types."""
    manifest = model_dir / "manifest.json"
    if manifest.is_file():
        try:
            precision = json.loads(manifest.read_text(encoding="utf-8")).get("precision")
        except json.JSONDecodeError:
            precision = None
        if isinstance(precision, str) and precision:
            return precision
    model_file = model_dir / "model.onnx"
    if not model_file.is_file():
        return "unknown"
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            return f"int{bits}"
        if node.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul"):
            return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer):
        return "fp16"
    return "fp32"


def search_options(sampling: SamplingParams, max_length: int) -> dict[str, Any]:
    """onnxruntime-genai search options for one request (its defaults from genai_config are overridden)."""
    options: dict[str, Any] = {
        "max_length": max_length,
        "min_length": 0,
        "num_beams": 1,
        "repetition_penalty": float(sampling.repetition_penalty),
        "random_seed": -1 if sampling.seed is None else int(sampling.seed),
    }
    if sampling.is_greedy:
        options.update(do_sample=False, top_k=1, top_p=1.0, temperature=1.0)
    else:
        # top_k 0 means "no top-k filter" for us and for onnxruntime-genai alike.
        options.update(
            do_sample=True,
            temperature=float(sampling.temperature),
            top_p=float(sampling.top_p),
            top_k=int(sampling.top_k),
        )
    return options


class _GenaiStream:
    """Fallback when the folder has no tokenizer.json (e.g. a SentencePiece model): onnxruntime-genai's stream."""

    def __init__(self, tokenizer: Any) -> None:
        self._stream = tokenizer.create_stream()

    def add(self, token_id: int) -> str:
        return self._stream.decode(token_id)

    def flush(self) -> str:
        return ""


class _Active:
    """Per-request state shared between its generating thread and `cancel` callers."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = threading.Event()


class OrtGenaiBackend:
    """One exported model on one execution provider; streams TokenChunks for concurrent requests."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "npu",
        providers: Sequence[str] | None = None,
        simulated: bool = False,
        max_batch_size: int = 4,
        num_threads: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        if device not in ("npu", "gpu", "cpu"):
            raise ValueError(f"device must be 'npu', 'gpu' or 'cpu' (got {device!r})")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1 (got {max_batch_size!r})")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(
                f"num_threads must be an integer >= 1 or None for onnxruntime's default (got {num_threads!r})"
            )
        self.device = device
        self.simulated = bool(simulated)
        self.max_batch_size = max_batch_size
        self.num_threads = num_threads
        self._explicit_providers = providers is not None
        self._candidates: list[ProviderSpec] = preference_for(device, providers)
        if self.simulated and not self._explicit_providers:
            # A simulated accelerator runs on the CPU by definition: don't probe real accelerator providers.
            self._candidates = preference_for("cpu")
        self.load_attempts: list[tuple[str, str]] = []
        self._spec: ProviderSpec | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._chat_tokenizer: Any = None
        self._template: ChatTemplate | None = None
        self._eos_ids: frozenset[int] = frozenset()
        self._context_length = 0
        self._precision = "unknown"
        self._slots = threading.BoundedSemaphore(max_batch_size)
        self._lock = threading.Lock()
        self._active: dict[str, _Active] = {}
        self._encode_lock = threading.Lock()
        self._detok: Detokenizer | None = None
        self._last_error = ""

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model with the first provider that works; records the ones that did not."""
        if self._model is not None:
            return
        if not self.model_dir.is_dir():
            raise BackendError(f"model folder {self.model_dir} does not exist; export the model first")
        config = read_genai_config(self.model_dir)
        import onnxruntime_genai as og

        try:
            result = load_with_fallback(
                self.model_dir, self._candidates, explicit=self._explicit_providers, num_threads=self.num_threads
            )
        except BackendError as exc:
            self.load_attempts = list(getattr(exc, "attempts", []))
            raise
        try:
            tokenizer = og.Tokenizer(result.model)
            chat_tokenizer = og.Tokenizer(result.model)
            # Chat templates carry their own special tokens: encode them as transformers does (no extra BOS).
            chat_tokenizer.update_options(add_special_tokens="false")
        except Exception as exc:
            raise BackendError(
                f"onnxruntime-genai could not load the tokenizer in {self.model_dir}: {exc}. "
                "Fix: re-export so the folder holds tokenizer.json and tokenizer_config.json"
            ) from exc
        model_cfg = config.get("model", {})
        eos = model_cfg.get("eos_token_id", [])
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        eos_ids.update(int(t) for t in tokenizer.eos_token_ids)
        self._template = load_chat_template(self.model_dir)
        self._detok = None
        if (self.model_dir / "tokenizer.json").is_file():
            try:
                self._detok = Detokenizer(self.model_dir / "tokenizer.json")
            except Exception as exc:
                log.warning(
                    "tokenizer.json in %s does not load (%s); streaming with onnxruntime-genai's decoder",
                    self.model_dir,
                    exc,
                )
        self._context_length = int(model_cfg.get("context_length") or config.get("search", {}).get("max_length") or 0)
        if self._context_length <= 0:
            raise BackendError(f"{self.model_dir}/genai_config.json has no model.context_length; re-export the model")
        self._precision = detect_precision(self.model_dir)
        self._eos_ids = frozenset(int(t) for t in eos_ids)
        self._tokenizer, self._chat_tokenizer = tokenizer, chat_tokenizer
        self.load_attempts = list(result.attempts)
        self._spec, self._model = result.spec, result.model
        log.info(
            "loaded %s on %s (%s%s)",
            self.model_dir,
            result.spec.ort_name,
            self.device,
            ", simulated" if self.simulated else "",
        )

    def unload(self) -> None:
        """Cancel running requests and drop the model; `load` may be called again."""
        with self._lock:
            for state in self._active.values():
                state.cancelled.set()
        self._model = self._tokenizer = self._chat_tokenizer = None
        self._spec = None

    # ---- reporting -------------------------------------------------------------------------------------------

    @property
    def provider(self) -> str:
        """The execution provider that runs the model (onnxruntime's name); set by `load`."""
        if self._spec is None:
            raise BackendError("the backend is not loaded; call load() first")
        return self._spec.ort_name

    def capabilities(self) -> BackendCapabilities:
        provider = self.provider
        # Report the device the provider really runs on (CPU is never called NPU/GPU, DirectML is a GPU);
        # only a device declared simulated keeps its kind, and says simulated.
        device = self.device if self.simulated else self._spec.runs_on
        return BackendCapabilities(
            name=BACKEND_NAME,
            device=device,
            provider=provider,
            precision=self._precision,
            max_batch_size=self.max_batch_size,
            context_length=self._context_length,
            simulated=self.simulated,
            streaming=True,
        )

    def health(self) -> BackendHealth:
        with self._lock:
            active = len(self._active)
        if self._model is None:
            return BackendHealth(False, active, "not loaded")
        detail = f"{self._spec.ort_name if self._spec else '?'}"
        if self._last_error:
            detail += f"; last error: {self._last_error}"
        return BackendHealth(True, active, detail)

    # ---- generation ------------------------------------------------------------------------------------------

    def encode(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids: the model's chat template for `messages`, the tokenizer's defaults for `prompt`."""
        self._require_loaded()
        if request.messages is not None:
            if self._template is None:
                raise ValueError(
                    f"{self.model_dir} has no chat template (tokenizer_config.json chat_template); "
                    "send a raw `prompt` instead of `messages`"
                )
            text, tokenizer = self._template.render(request.messages, add_generation_prompt=True), self._chat_tokenizer
        else:
            text, tokenizer = request.prompt or "", self._tokenizer
        with self._encode_lock:
            ids = [int(t) for t in tokenizer.encode(text)]
        if not ids:
            raise ValueError("the prompt encodes to no tokens; send non-empty text")
        return ids

    def generate(self, request: GenerationRequest) -> Iterator[TokenChunk]:
        """Stream the reply. Bad input (context overflow, template errors) raises here, before any work."""
        ids = self.encode(request)
        limit = len(ids) + request.sampling.max_new_tokens
        if limit > self._context_length:
            raise ContextOverflowError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({request.sampling.max_new_tokens}) = {limit} "
                f"exceeds the model's context length {self._context_length}; shorten the prompt or lower max_new_tokens"
            )
        state = _Active()
        with self._lock:
            if request.request_id in self._active:
                raise ValueError(f"request_id {request.request_id!r} is already generating; use a unique id")
            self._active[request.request_id] = state
        return self._stream(request, ids, state)

    def cancel(self, request_id: str) -> bool:
        """Stop a running or queued request within one decode step; False when no such request runs."""
        with self._lock:
            state = self._active.get(request_id)
        if state is None:
            return False
        state.cancelled.set()
        return True

    def _require_loaded(self) -> None:
        if self._model is None:
            raise BackendError("the backend is not loaded; call load() first")

    def _acquire_slot(self, state: _Active) -> bool:
        """Wait for one of max_batch_size slots; False if the request was cancelled while waiting."""
        while not self._slots.acquire(timeout=_WAIT_POLL_S):
            if state.cancelled.is_set():
                return False
        return True

    def _stream(self, request: GenerationRequest, ids: list[int], state: _Active) -> Iterator[TokenChunk]:
        rid, sampling = request.request_id, request.sampling
        try:
            if not self._acquire_slot(state):
                yield TokenChunk(rid, "", finish_reason="cancelled", prompt_tokens=len(ids))
                return
            try:
                yield from self._decode(rid, sampling, ids, state)
            finally:
                self._slots.release()
        finally:
            with self._lock:
                self._active.pop(rid, None)

    def _decode(self, rid: str, sampling: SamplingParams, ids: list[int], state: _Active) -> Iterator[TokenChunk]:
        import onnxruntime_genai as og

        model, tokenizer = self._model, self._tokenizer
        if model is None:
            raise BackendError("the backend was unloaded while the request waited; load() it again")
        params = og.GeneratorParams(model)
        params.set_search_options(**search_options(sampling, len(ids) + sampling.max_new_tokens))
        try:
            generator = og.Generator(model, params)
            generator.append_tokens(ids)  # prefill runs here
        except Exception as exc:
            self._last_error = str(exc)
            raise BackendError(f"onnxruntime-genai failed on the prompt ({self.provider}): {exc}") from exc
        stream: StreamDecoder = self._detok.stream(ids) if self._detok is not None else _GenaiStream(tokenizer)
        stops = StopStringMatcher(sampling.stop) if sampling.stop else None
        eos_ids, cancelled = self._eos_ids, state.cancelled
        n_prompt, produced = len(ids), 0
        finish = "length"
        while True:
            if cancelled.is_set():
                finish = "cancelled"
                break
            if generator.is_done():
                break
            try:
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
            except Exception as exc:
                self._last_error = str(exc)
                raise BackendError(f"onnxruntime-genai failed while decoding ({self.provider}): {exc}") from exc
            produced += 1
            if token in eos_ids:
                finish = "stop"
                break
            text = stream.add(token)
            if produced >= sampling.max_new_tokens:
                text += stream.flush()
            if stops is not None:
                text, hit = stops.feed(text)
                if hit:
                    yield TokenChunk(rid, text, [token], "stop", n_prompt)
                    return
            if produced >= sampling.max_new_tokens:
                tail = stops.flush() if stops is not None else ""
                yield TokenChunk(rid, text + tail, [token], "length", n_prompt)
                return
            yield TokenChunk(rid, text, [token], None, n_prompt)
        tail = ""
        if finish != "cancelled":
            tail = stream.flush()
            if stops is not None:
                tail, hit = stops.feed(tail)
                tail += "" if hit else stops.flush()
                finish = "stop" if hit else finish
        yield TokenChunk(rid, tail, [], finish, n_prompt)  # type: ignore[arg-type]
