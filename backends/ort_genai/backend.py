"""onnxruntime-genai backend: an exported folder on one execution provider (QNN, OpenVINO, DirectML, CPU).

One loaded `og.Model` serves every request the engine admits, each on its own `og.Generator` driven by
the calling thread (onnxruntime sessions are thread-safe for Run, and onnxruntime-genai releases the GIL
while it computes). Admission and queueing belong to the engine; this class just runs what it is given.
Why generators per request rather than og.Engine or batched GeneratorParams: docs/architecture.md.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backends.base import (
    BackendCapabilities,
    BackendError,
    BackendHealth,
    ContextOverflowError,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)
from backends.ort_genai.providers import ProviderSpec, load_with_fallback, preference_for
from backends.prompt import PromptEncoder
from backends.stream import TokenStream, token_logprob

log = logging.getLogger(__name__)

BACKEND_NAME = "onnxruntime-genai"


def read_genai_config(model_dir: Path) -> dict[str, Any]:
    """genai_config.json of an exported folder, with a clear error when the folder is not an export."""
    path = model_dir / "genai_config.json"
    if not path.is_file():
        raise BackendError(
            f"{model_dir} has no genai_config.json: it is not an onnxruntime-genai export. "
            "Fix: export it first, e.g. plugin.convert.export(model, target='npu', precision='int4')"
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


def prompt_span(n_prompt: int, window: int) -> int:
    """KV positions a prompt takes: a static-shape pipeline prefills whole windows, and onnxruntime-genai keeps
    the padding in the sequence (new tokens start at the returned position); 0 means no window."""
    return -(-n_prompt // window) * window if window else n_prompt


def search_options(sampling: SamplingParams, prompt_span: int) -> dict[str, Any]:
    """onnxruntime-genai search options for one request (its defaults from genai_config are overridden).

    `prompt_span` is the KV positions the prompt takes; min_length keeps EOS from being sampled before
    min_tokens (or at all, with ignore_eos).
    """
    options: dict[str, Any] = {
        "max_length": prompt_span + sampling.max_new_tokens,
        "min_length": prompt_span + sampling.suppressed_until(),
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
        self._encoder: PromptEncoder | None = None
        self._eos_ids: frozenset[int] = frozenset()
        self._context_length = 0
        self._window = 0  # a static-shape pipeline's prefill window (the prompt is padded to a multiple of it)
        self._precision = "unknown"
        self._lock = threading.Lock()
        self._active: dict[str, _Active] = {}
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
            encoder = PromptEncoder.from_folder(self.model_dir)
            genai_eos = [int(t) for t in og.Tokenizer(result.model).eos_token_ids]
        except Exception as exc:
            raise BackendError(
                f"the tokenizer in {self.model_dir} does not load: {exc}. "
                "Fix: re-export so the folder holds tokenizer.json and tokenizer_config.json"
            ) from exc
        model_cfg = config.get("model", {})
        eos = model_cfg.get("eos_token_id", [])
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        eos_ids.update(genai_eos)
        self._context_length = int(model_cfg.get("context_length") or config.get("search", {}).get("max_length") or 0)
        window = (model_cfg.get("decoder", {}).get("sliding_window") or {}).get("window_size")
        self._window = int(window) if window else 0
        if self._context_length <= 0:
            raise BackendError(f"{self.model_dir}/genai_config.json has no model.context_length; re-export the model")
        self._precision = detect_precision(self.model_dir)
        self._eos_ids = frozenset(int(t) for t in eos_ids)
        self._encoder = encoder
        self.load_attempts = list(result.attempts)
        self._spec, self._model = result.spec, result.model
        self._last_error = ""
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
        self._model = self._encoder = None
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
        assert self._spec is not None
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
            emulated=self._spec.emulated,
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
        """Prompt token ids (given ids, else the model's chat template for `messages`, or the raw `prompt`)."""
        if self._encoder is None:
            raise BackendError("the backend is not loaded; call load() first")
        return self._encoder.encode(request)

    def generate(self, request: GenerationRequest) -> Iterator[TokenChunk]:
        """Stream the reply. Bad input (context overflow, template errors) raises here, before any work."""
        ids = self.encode(request)
        span = self._prompt_span(len(ids))
        limit = span + request.sampling.max_new_tokens
        if limit > self._context_length:
            padded = f", padded to {span} for the {self._window}-token prefill window" if span != len(ids) else ""
            raise ContextOverflowError(
                f"prompt ({len(ids)} tokens{padded}) + max_new_tokens ({request.sampling.max_new_tokens}) = {limit} "
                f"exceeds the model's context length {self._context_length}; shorten the prompt or lower max_new_tokens"
            )
        state = _Active()
        with self._lock:
            if request.request_id in self._active:
                raise ValueError(f"request_id {request.request_id!r} is already generating; use a unique id")
            self._active[request.request_id] = state
        return self._stream(request, ids, state)

    def _prompt_span(self, n_prompt: int) -> int:
        return prompt_span(n_prompt, self._window)

    def cancel(self, request_id: str) -> bool:
        """Stop a running request within one decode step; False when no such request runs."""
        with self._lock:
            state = self._active.get(request_id)
        if state is None:
            return False
        state.cancelled.set()
        return True

    def _stream(self, request: GenerationRequest, ids: list[int], state: _Active) -> Iterator[TokenChunk]:
        try:
            yield from self._decode(request.request_id, request.sampling, ids, state)
        finally:
            with self._lock:
                self._active.pop(request.request_id, None)

    def _decode(self, rid: str, sampling: SamplingParams, ids: list[int], state: _Active) -> Iterator[TokenChunk]:
        import onnxruntime_genai as og

        model, encoder = self._model, self._encoder
        if model is None or encoder is None:
            raise BackendError("the backend was unloaded before the request started; load() it again")
        stream = TokenStream(rid, len(ids), sampling, self._eos_ids, encoder.decoder(ids))
        if state.cancelled.is_set():
            yield stream.end("cancelled")
            return
        params = og.GeneratorParams(model)
        params.set_search_options(**search_options(sampling, self._prompt_span(len(ids))))
        try:
            generator = og.Generator(model, params)
            generator.append_tokens(ids)  # prefill runs here
        except Exception as exc:
            self._last_error = str(exc)
            raise BackendError(f"onnxruntime-genai failed on the prompt ({self.provider}): {exc}") from exc
        while True:
            if state.cancelled.is_set():
                yield stream.end("cancelled")
                return
            if generator.is_done():
                yield stream.end("length")
                return
            try:
                # onnxruntime-genai computes the next step's logits eagerly: read them before sampling from them
                logits = None if sampling.logprobs is None else np.array(generator.get_logits())
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                logprob = None if logits is None else token_logprob(logits, token, sampling.logprobs)
            except Exception as exc:
                self._last_error = str(exc)
                raise BackendError(f"onnxruntime-genai failed while decoding ({self.provider}): {exc}") from exc
            chunk = stream.push(token, logprob)
            yield chunk
            if chunk.finish_reason is not None:
                return
