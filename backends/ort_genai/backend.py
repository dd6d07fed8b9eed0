"""onnxruntime-genai backend: an exported folder on one execution provider (QNN, OpenVINO, DirectML, CPU).

On the CPU provider, a fused export (GroupQueryAttention over a shared KV buffer) is served by continuous
batching: concurrent requests share decode steps, joining and leaving at any step (batching.py, which
also says why not og.Engine). Anything else (the HTP pipeline package, plain Optimum graphs, accelerator
providers) keeps one `og.Generator` per request, driven by the calling thread (onnxruntime sessions are
thread-safe for Run, and onnxruntime-genai releases the GIL while it computes). Admission and queueing
belong to the engine; this class just runs what it is given.
"""

from __future__ import annotations

import gc
import json
import logging
import queue
import subprocess
import threading
import weakref
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
from backends.memory import LedgerError, MemoryLedger, Reservation, host_ledger
from backends.ort_genai.batching import (
    STATIC_PIPELINE_REASON,
    GraphSpec,
    OrtBatchRunner,
    Work,
    batch_plan,
    graph_spec,
    make_work,
    session_inputs,
)
from backends.ort_genai.kernels import open_retyped_session, rows_graph, rows_kernel
from backends.ort_genai.memory import BATCHED_KV_SLACK, ExportNeeds, export_needs
from backends.ort_genai.providers import (
    LoadResult,
    ProviderSpec,
    build_config,
    load_with_fallback,
    preference_for,
    session_threads,
    viable_candidates,
)
from backends.ort_genai.resident import release_weight_pages
from backends.prompt import PromptEncoder
from backends.stream import TokenStream, token_logprob

log = logging.getLogger(__name__)

BACKEND_NAME = "onnxruntime-genai"
BATCHED_MAX_BATCH_SIZE = 8
"""Requests the engine admits at once when decode steps are shared (one stream at a time otherwise gets 4)."""
GENERATOR_MAX_BATCH_SIZE = 4


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
        max_batch_size: int | None = None,
        num_threads: int | None = None,
        batching: bool | None = None,
    ) -> None:
        """`batching`: None shares decode steps where the export and provider allow it (else one generator
        per request), False always uses generators, True asks for batching (refused at load when impossible).
        `max_batch_size` None means 8 when batched, 4 with generators."""
        self.model_dir = Path(model_dir)
        if device not in ("npu", "gpu", "cpu"):
            raise ValueError(f"device must be 'npu', 'gpu' or 'cpu' (got {device!r})")
        if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be an integer >= 1 (got {max_batch_size!r})")
        if batching not in (None, True, False):
            raise ValueError(f"batching must be None (auto), True or False (got {batching!r})")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(
                f"num_threads must be an integer >= 1 or None for onnxruntime's default (got {num_threads!r})"
            )
        self.device = device
        self.simulated = bool(simulated)
        self._max_batch_size = max_batch_size
        self.num_threads = num_threads
        self.batching = batching
        self.batching_reason = ""  # why the loaded model is (not) batched
        self.kernels = ""  # which kernels the batched session's 4-/8-bit MatMuls run on, and why
        self._runner: OrtBatchRunner | None = None
        self._batched: dict[str, Work] = {}  # batched requests whose caller has not read their last chunk
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
        self._reservation: Reservation | None = None
        self._release_on_gc: weakref.finalize | None = None
        self._kv_budget: int | None = None
        self._kv_bytes_per_token = 0

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model with the first provider that works; records the ones that did not."""
        if self._model is not None or self._runner is not None:
            return
        if not self.model_dir.is_dir():
            raise BackendError(f"model folder {self.model_dir} does not exist; export the model first")
        config = read_genai_config(self.model_dir)
        needs = export_needs(
            self.model_dir,
            config,
            detect_precision(self.model_dir),
            max_batch=self._max_batch_size or BATCHED_MAX_BATCH_SIZE,
        )
        self._reservation = self._reserve(needs)
        try:
            self._load(config, needs)
        except BaseException:
            self._release()
            raise

    # ---- the memory ledger -----------------------------------------------------------------------------------

    def _ledger(self) -> MemoryLedger | None:
        """The host ledger when every provider this load may use keeps the model in system RAM (the CPU, a
        simulated device, NPUs sharing host memory); None for a GPU provider (not measurable from here)."""
        if self.simulated or all(spec.runs_on in ("cpu", "npu") for spec in self._candidates):
            return host_ledger()
        return None

    def _reserve(self, needs: ExportNeeds) -> Reservation | None:
        """Reserve weights + activations + as much KV cache as a full batch can use (at least one sequence),
        with the batched path's slack, before anything loads; refuse the load when even that does not fit."""
        book = self._ledger()
        if book is None:
            log.info("%s: a GPU provider's memory is not reserved in the ledger (not measurable here)", self.model_dir)
            return None
        owner = f"onnxruntime-genai {self.model_dir.name} #{id(self):x}"
        try:
            reservation = book.reserve(
                owner,
                weights=needs.weights,
                activations=needs.activations,
                min_kv=needs.one_sequence_kv,
                max_kv=max(int(needs.full_batch_kv * BATCHED_KV_SLACK), needs.one_sequence_kv),
                kv_transient=1.0 if self.batching is not False else 0.0,
            )
        except LedgerError as exc:
            raise BackendError(
                f"{self.model_dir.name} does not fit in memory: {exc}. Use a smaller export (int4), a smaller "
                "max_batch_size, or free memory"
            ) from exc
        self._release_on_gc = weakref.finalize(self, book.release, owner)  # a backend dropped without unload
        return reservation

    def _release(self) -> None:
        if self._release_on_gc is not None:
            self._release_on_gc()  # releases once, then detaches
            self._release_on_gc = None
        self._reservation = None
        self._kv_budget = None

    @property
    def reservation(self) -> Reservation | None:
        """What this backend holds in the memory ledger (None while not loaded, or on a GPU provider)."""
        return self._reservation

    def _load(self, config: dict[str, Any], needs: ExportNeeds) -> None:
        import onnxruntime_genai as og

        model_cfg = config.get("model", {})
        self._context_length = int(model_cfg.get("context_length") or config.get("search", {}).get("max_length") or 0)
        window = (model_cfg.get("decoder", {}).get("sliding_window") or {}).get("window_size")
        self._window = int(window) if window else 0
        if self._context_length <= 0:
            raise BackendError(f"{self.model_dir}/genai_config.json has no model.context_length; re-export the model")
        try:
            encoder = PromptEncoder.from_folder(self.model_dir)
        except Exception as exc:
            raise BackendError(
                f"the tokenizer in {self.model_dir} does not load: {exc}. "
                "Fix: re-export so the folder holds tokenizer.json and tokenizer_config.json"
            ) from exc
        result, runner, why = self._open_batched()
        if result is None:
            try:
                result = load_with_fallback(
                    self.model_dir, self._candidates, explicit=self._explicit_providers, num_threads=self.num_threads
                )
            except BackendError as exc:
                self.load_attempts = list(getattr(exc, "attempts", []))
                raise
        eos = model_cfg.get("eos_token_id", [])
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        if result.model is not None:
            eos_ids.update(int(t) for t in og.Tokenizer(result.model).eos_token_ids)
        self._precision = detect_precision(self.model_dir)
        self._eos_ids = frozenset(int(t) for t in eos_ids)
        model, spec = result.model, result.spec
        if runner is None and not why:
            plan, why = self._batch_plan(spec)
            if plan is not None:
                # The batched path runs its own onnxruntime session: the og.Model goes first, so that the weights
                # are never resident twice (a peak of ~130 MB more on the default int4 export otherwise).
                model = result.model = None
                gc.collect()
                runner, why = self._batched_runner(plan, spec)
                if runner is None:  # onnxruntime cannot batch the graph itself: generators still can
                    model = og.Model(build_config(self.model_dir, spec, self.num_threads))
        if runner is None:
            if self.batching:
                raise BackendError(f"batching=True but {self.model_dir} cannot be batched here: {why}")
            self.batching_reason = why if self.batching is False else f"one generator per request: {why}"
            log.info("%s: %s", self.model_dir, self.batching_reason)
            release_weight_pages(sorted(self.model_dir.glob("*.data")))  # as the batched runner does (resident.py)
        else:
            runner.start()
            self.batching_reason = "continuous batching: requests share decode steps"
        self._encoder = encoder
        self.load_attempts = list(result.attempts)
        self._spec, self._model = spec, model
        self._runner = runner
        self._last_error = ""
        self._kv_bytes_per_token = needs.kv_bytes_per_token
        if runner is not None:  # the cache's real element size, as the graph declares it
            per_token = 2 * len(runner.spec.past) * runner.spec.kv_heads * runner.spec.head_size
            self._kv_bytes_per_token = per_token * np.dtype(runner.spec.kv_dtype).itemsize
        if self._reservation is not None:
            # the engine's admission counts rows x longest; the batched buffers may hold BATCHED_KV_SLACK times that
            slack = BATCHED_KV_SLACK if runner is not None else 1.0
            self._kv_budget = int(self._reservation.kv / slack)
        log.info(
            "loaded %s on %s (%s%s; %s%s)",
            self.model_dir,
            result.spec.ort_name,
            self.device,
            ", simulated" if self.simulated else "",
            self.batching_reason,
            f"; {self.kernels}" if self.kernels else "",
        )

    def _open_batched(self) -> tuple[LoadResult | None, OrtBatchRunner | None, str]:
        """When the first provider worth trying is the CPU and the export can be batched, open only the
        batched onnxruntime session: loading an og.Model first (to learn the provider) and dropping it would
        leave its heap behind, ~27 MB of peak RSS on the default int4 export. (None, None, "") otherwise,
        and the generic load decides; (None, None, why) when the session itself failed."""
        attempts: list[tuple[str, str]] = []
        explicit = self._explicit_providers
        viable = viable_candidates(self.model_dir, self._candidates, explicit=explicit, attempts=attempts)
        spec = next(iter(viable), None)
        if spec is None or spec.key != "cpu":
            return None, None, ""
        plan, _ = self._batch_plan(spec)
        if plan is None:
            return None, None, ""
        runner, why = self._batched_runner(plan, spec)
        return (LoadResult(None, spec, attempts) if runner else None), runner, why

    def _batched_runner(self, plan: GraphSpec, spec: ProviderSpec) -> tuple[OrtBatchRunner | None, str]:
        """The batched runner on its own session, the KV layout read from that session's inputs; else why not."""
        try:
            session = self._session(plan, spec)
        except Exception as exc:  # onnxruntime cannot open the graph itself
            return None, f"onnxruntime could not open the graph for batching ({exc})"
        graph, why = graph_spec(plan, session_inputs(session))
        if graph is None:
            return None, why
        return OrtBatchRunner(session, graph, max_batch_size=self._max_batch_size or BATCHED_MAX_BATCH_SIZE), ""

    def _batch_plan(self, spec: ProviderSpec) -> tuple[GraphSpec | None, str]:
        """The graph to batch when this export on this provider allows it, else (None, why generators)."""
        if self.batching is False:
            return None, "one generator per request (batching=False)"
        if self._window:
            return None, STATIC_PIPELINE_REASON
        if spec.key != "cpu":
            return None, f"{spec.ort_name} runs one generator per request; shared decode steps need the CPU provider"
        return batch_plan(self.model_dir)

    def _session(self, graph: GraphSpec, spec: ProviderSpec) -> Any:
        """An onnxruntime session on the CPU provider with the thread settings generators get."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        for key, value in session_threads(spec, self.num_threads).items():
            setattr(options, key, value)
        options.log_severity_level = 3
        retyped = self._rows_graph(graph.model_file)
        if retyped is None:
            return ort.InferenceSession(str(graph.model_file), options, providers=["CPUExecutionProvider"])
        library, retyped_file = retyped
        return open_retyped_session(library, retyped_file, graph.model_file.parent, options)

    def _rows_graph(self, model_file: Path) -> tuple[Path, Path] | None:
        """(kernel library, retyped graph) when the rows kernel serves this export here, else None; the reason
        either way goes to `self.kernels` (reported with the batching line)."""
        kernel = rows_kernel()
        if kernel.library is None:
            self.kernels = kernel.reason
            return None
        try:
            retyped, count = rows_graph(model_file)
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
            log.warning("rows kernel not used for %s: %s", model_file, exc)
            self.kernels = f"onnxruntime's MatMulNBits (retyping failed: {exc})"
            return None
        if retyped is None:
            self.kernels = "onnxruntime's MatMulNBits (no int8-compute MatMulNBits for the rows kernel)"
            return None
        self.kernels = f"rows kernel (AVX-512 VNNI) for {count} int8-compute MatMulNBits"
        return kernel.library, retyped

    @property
    def max_batch_size(self) -> int:
        """Requests the engine may run here at once (explicit, else by how the loaded model is served)."""
        if self._max_batch_size is not None:
            return self._max_batch_size
        if self._window:  # batch-1 static graphs: one stream at a time, the engine queues the others
            return 1
        return BATCHED_MAX_BATCH_SIZE if self._runner is not None else GENERATOR_MAX_BATCH_SIZE

    def unload(self) -> None:
        """Cancel running requests and drop the model; `load` may be called again."""
        with self._lock:
            for state in self._active.values():
                state.cancelled.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.stop("the model was unloaded")
        self._model = self._encoder = None
        self._spec = None
        self._release()

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
            kv_budget_bytes=self._kv_budget if self._kv_bytes_per_token else None,
            kv_bytes_per_token=self._kv_bytes_per_token,
        )

    def health(self) -> BackendHealth:
        runner = self._runner
        with self._lock:
            active = len(self._active) + len(self._batched)
        if self._model is None and runner is None:
            return BackendHealth(False, active, "not loaded")
        if runner is not None and not runner.alive:
            return BackendHealth(False, active, f"batch scheduler stopped: {runner.last_error or 'unknown'}")
        detail = f"{self._spec.ort_name if self._spec else '?'}; {self.batching_reason}"
        if self.kernels:
            detail += f"; {self.kernels}"
        if runner is not None:
            self._last_error = runner.last_error or self._last_error
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
        runner = self._runner
        if runner is not None:
            assert self._encoder is not None
            work = make_work(request.request_id, ids, request.sampling, self._eos_ids, self._encoder.decoder(ids))
            with self._lock:
                if request.request_id in self._batched:
                    raise ValueError(f"request_id {request.request_id!r} is already generating; use a unique id")
                self._batched[request.request_id] = work
            try:
                runner.submit(work)
            except BaseException:
                with self._lock:
                    self._batched.pop(request.request_id, None)
                raise
            return self._batched_stream(runner, work)
        state = _Active()
        with self._lock:
            if request.request_id in self._active:
                raise ValueError(f"request_id {request.request_id!r} is already generating; use a unique id")
            self._active[request.request_id] = state
        return self._stream(request, ids, state)

    def _batched_stream(self, runner: OrtBatchRunner, work: Work) -> Iterator[TokenChunk]:
        """The request's chunks as the scheduler thread produces them. A cancel ends the caller's stream at
        once (tokens already produced ahead of the caller are not delivered), however far the thread got."""
        finished = False
        try:
            while True:
                if work.cancelled:
                    chunk = TokenChunk(work.request_id, "", [], "cancelled", len(work.prompt_ids))
                else:
                    try:
                        chunk = work.out.get(timeout=0.5)
                    except queue.Empty:
                        if runner.alive:
                            continue
                        reason = runner.last_error or "the batch scheduler stopped"
                        chunk = TokenChunk(work.request_id, "", [], "error", len(work.prompt_ids), reason)
                finished = chunk.finish_reason is not None
                yield chunk
                if finished:
                    return
        finally:
            with self._lock:
                self._batched.pop(work.request_id, None)
            if not finished or work.cancelled:  # the caller stopped reading: free the batch row
                runner.cancel(work.request_id)

    def _prompt_span(self, n_prompt: int) -> int:
        return prompt_span(n_prompt, self._window)

    def cancel(self, request_id: str) -> bool:
        """Stop a running request within one decode step; False when no such request runs."""
        runner = self._runner
        with self._lock:
            work = self._batched.get(request_id)
            if work is not None:
                work.cancelled = True
        if work is not None:
            assert runner is not None
            runner.cancel(request_id)  # False when the thread already finished it: the caller's stream still ends
            return True
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
