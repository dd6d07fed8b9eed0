"""The GPU path: a transformers causal LM on CUDA (bf16/fp16) or on the CPU (fp32) as the floor.

Concurrent `generate()` calls share decode steps through one scheduler thread (see batching.py for
the design). This module owns what surrounds it: choosing the device and precision, refusing models
that do not fit, turning a request into prompt ids (chat template or raw prompt), and the streams.

What runs is reported as it is: provider "cuda:N" only when the weights really are on that GPU, "cpu"
otherwise. A simulated GPU (simulated_device="gpu") runs on the CPU and says so (simulated=True).
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from backends.base import (
    BackendCapabilities,
    BackendError,
    BackendHealth,
    ContextOverflowError,
    GenerationRequest,
    TokenChunk,
)
from backends.memory import fits, kv_cache_bytes
from backends.profile import ModelProfile, profile_from_config
from backends.prompt import PromptEncoder
from backends.torch.batching import BatchRunner, Work, make_work

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
LOAD_KV_TOKENS = 4096
"""At load, weights plus the KV cache of one sequence of min(context length, this) tokens must fit;
larger batches are then admitted per request against the remaining budget."""


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def resolve_device(device: str) -> torch.device:
    """'auto' -> the CUDA GPU with the most free memory, else the CPU; 'cuda[:N]' must really exist."""
    if not isinstance(device, str):
        raise ValueError(f"device must be a string like 'auto', 'cpu', 'cuda' or 'cuda:0' (got {device!r})")
    d = device.strip().lower()
    if d == "auto":
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
            return torch.device("cuda", max(range(len(free)), key=free.__getitem__))
        return torch.device("cpu")
    if d == "cpu":
        return torch.device("cpu")
    if d == "cuda" or d.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BackendError(
                f"device {device!r} asked for CUDA but torch.cuda.is_available() is False (CPU-only torch build or "
                "no NVIDIA driver); use device='cpu' or 'auto'"
            )
        index = 0 if d == "cuda" else _parse_index(device, d[5:])
        if index >= torch.cuda.device_count():
            raise BackendError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present; "
                f"use an index below {torch.cuda.device_count()}"
            )
        return torch.device("cuda", index)
    raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _parse_index(device: str, text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"device {device!r}: expected 'cuda:N' with N a GPU index")
    return int(text)


def resolve_precision(dtype: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs that support it, else fp16; fp32 on the CPU."""
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be one of 'auto', 'fp32', 'fp16', 'bf16' (got {dtype!r})")
    d = _DTYPE_ALIASES.get(dtype.strip().lower(), dtype.strip().lower())
    if d == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if d not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'fp32', 'fp16' or 'bf16'")
    if d == "fp16" and device.type == "cpu":
        log.warning("fp16 on the CPU is slow and less accurate than fp32/bf16; consider dtype='fp32' or 'bf16'")
    return d


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of the device right now: CUDA's own count, or available system RAM for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device.index or 0)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _model_location(model_path: str | Path) -> tuple[Path, str | None]:
    """(folder, gguf_file) for from_pretrained: a .gguf file is loaded from its folder by name."""
    p = Path(model_path).expanduser()
    if not p.exists():
        raise BackendError(f"model path {str(p)!r} does not exist; pass a local HF checkpoint folder or a .gguf file")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise BackendError(f"{p.name} is a file but not a .gguf; pass the checkpoint folder instead")
        return p.parent, p.name
    if not (p / "config.json").exists():
        raise BackendError(f"{str(p)!r} has no config.json; pass a Hugging Face checkpoint folder (or a .gguf file)")
    return p, None


class TorchBackend:
    """transformers/torch backend with continuous batching of concurrent requests."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 8,
        memory_limit_bytes: int | None = None,
        simulated_device: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1 (got {max_batch_size!r})")
        if memory_limit_bytes is not None and (not isinstance(memory_limit_bytes, int) or memory_limit_bytes <= 0):
            raise ValueError(f"memory_limit_bytes must be a positive integer or None (got {memory_limit_bytes!r})")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be an integer >= 1 or None (got {num_threads!r})")
        self.folder, self.gguf_file = _model_location(model_path)
        self.name = self.gguf_file or self.folder.name
        self.device = resolve_device(device)
        if simulated_device is not None:
            if simulated_device not in ("gpu", "npu"):
                raise ValueError(f"simulated_device must be 'gpu', 'npu' or None (got {simulated_device!r})")
            if self.device.type != "cpu":
                raise ValueError(
                    f"simulated_device={simulated_device!r} only makes sense on the CPU, but device is {self.device}; "
                    "drop simulated_device to use the real GPU"
                )
        self.simulated_device = simulated_device
        self.precision = resolve_precision(dtype, self.device)
        self.max_batch_size = max_batch_size
        self.memory_limit_bytes = memory_limit_bytes
        self.num_threads = num_threads
        self.config = self._load_config()
        self.profile: ModelProfile = profile_from_config(self.config, self.name)
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.eos_ids: frozenset[int] = frozenset()
        self._runner: BatchRunner | None = None
        self._encoder: PromptEncoder | None = None
        self._weight_bytes = 0
        self._kv_budget: int | None = None
        self._encode_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._load_error = ""

    # ---- loading ------------------------------------------------------------------------------------
    def _load_config(self):
        from transformers import AutoConfig

        try:
            return (
                AutoConfig.from_pretrained(self.folder, gguf_file=self.gguf_file)
                if self.gguf_file
                else (AutoConfig.from_pretrained(self.folder))
            )
        except Exception as e:
            raise BackendError(f"cannot read the model config of {self.name}: {type(e).__name__}: {e}") from e

    @property
    def context_length(self) -> int:
        return self.profile.context_length

    def memory_budget_bytes(self) -> int:
        """The memory this backend may use: memory_limit_bytes when given, else the device's free memory."""
        return self.memory_limit_bytes if self.memory_limit_bytes is not None else free_memory_bytes(self.device)

    def check_fits(self) -> None:
        """Raise BackendError when weights + one sequence's KV cache exceed the device's budget."""
        budget = self.memory_budget_bytes()
        kv_tokens = min(self.context_length, LOAD_KV_TOKENS)
        weights, per_token = self.profile.weight_bytes(self.precision), self.profile.kv_bytes_per_token(self.precision)
        if not fits(weights, [kv_tokens], per_token, budget):
            need = weights + kv_cache_bytes([kv_tokens], per_token)
            where = "memory_limit_bytes" if self.memory_limit_bytes is not None else f"free memory on {self.device}"
            raise BackendError(
                f"{self.name} does not fit: it needs {_gib(need)} at {self.precision} (weights {_gib(weights)} + "
                f"KV cache for {kv_tokens} tokens {_gib(need - weights)}) but {where} is {_gib(budget)}. "
                "Use a smaller or quantized model, a lower precision (dtype='bf16'/'fp16'), another device, "
                "or free memory"
            )

    def load(self) -> None:
        with self._load_lock:
            if self.model is not None:
                return
            self.check_fits()
            budget = self.memory_budget_bytes()
            if self.num_threads is not None:
                torch.set_num_threads(self.num_threads)  # process-wide: torch has one intra-op pool
            from transformers import AutoModelForCausalLM

            kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
            try:
                encoder = PromptEncoder.from_folder(self.folder, self.gguf_file)
                tokenizer = encoder.tokenizer
                try:
                    model = AutoModelForCausalLM.from_pretrained(
                        self.folder, dtype=DTYPES[self.precision], attn_implementation="sdpa", **kwargs
                    )
                except ValueError as e:
                    if "sdpa" not in str(e).lower():
                        raise
                    log.info("%s has no SDPA attention; using eager attention", self.name)
                    model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=DTYPES[self.precision], **kwargs)
                model.to(self.device)
            except torch.cuda.OutOfMemoryError as e:
                self._load_error = f"out of memory loading {self.name} on {self.device}"
                raise BackendError(f"{self._load_error}; use a smaller model or lower precision") from e
            except (OSError, ValueError, KeyError) as e:
                self._load_error = f"cannot load {self.name}: {type(e).__name__}: {e}"
                raise BackendError(self._load_error) from e
            model.eval()
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
            self.profile = profile_from_config(
                self.config,
                self.name,
                num_parameters=sum(p.numel() for p in model.parameters()),
                has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
            )
            self.eos_ids = _eos_ids(model, tokenizer)
            if not self.eos_ids:
                log.warning("%s defines no EOS token; replies end only at max_new_tokens or a stop string", self.name)
            self._weight_bytes = weight_bytes
            self._kv_budget = max(budget - weight_bytes, 0)
            self._runner = BatchRunner(model, self.device, max_batch_size=self.max_batch_size, on_oom=self._after_oom)
            self.model, self.tokenizer, self._encoder = model, tokenizer, encoder
            self._runner.start()
            self._load_error = ""
            log.info(
                "loaded %s on %s (%s, %s weights, KV budget %s, batch <= %d)",
                self.name,
                self.device,
                self.precision,
                _gib(weight_bytes),
                _gib(self._kv_budget),
                self.max_batch_size,
            )

    def _after_oom(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def unload(self) -> None:
        with self._load_lock:
            if self._runner is not None:
                self._runner.stop("the torch backend was unloaded while this request was running")
            self._runner, self.model, self.tokenizer, self._encoder = None, None, None, None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # ---- requests -----------------------------------------------------------------------------------
    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Token ids of the request: given ids, else the chat template for messages, else the raw prompt."""
        encoder = self._require_loaded()._encoder
        assert encoder is not None
        return encoder.encode(request)

    def generate(self, request: GenerationRequest) -> Iterator[TokenChunk]:
        """Validate now (raising ContextOverflowError / ValueError before any work), then stream chunks."""
        runner = self._require_loaded()._runner
        assert runner is not None
        ids = self.prompt_ids(request)
        max_new = request.sampling.max_new_tokens
        if len(ids) + max_new > self.context_length:
            raise ContextOverflowError(
                f"prompt has {len(ids)} tokens + max_new_tokens {max_new} = {len(ids) + max_new}, more than the "
                f"context length {self.context_length} of {self.name}; shorten the prompt or set max_new_tokens "
                f"<= {max(self.context_length - len(ids), 0)}"
            )
        assert self._encoder is not None
        decoder = self._encoder.decoder(ids)
        work = make_work(request.request_id, ids, request.sampling, self.eos_ids, decoder, self.device)
        runner.submit(work)
        return self._stream(runner, work)

    def _stream(self, runner: BatchRunner, work: Work) -> Iterator[TokenChunk]:
        finished = False
        try:
            while True:
                try:
                    chunk = work.out.get(timeout=1.0)
                except queue.Empty:
                    if runner.alive:
                        continue
                    chunk = TokenChunk(
                        work.request_id, "", [], "error", len(work.prompt_ids), runner.last_error or "backend stopped"
                    )
                finished = chunk.finish_reason is not None
                yield chunk
                if finished:
                    return
        finally:
            if not finished:  # the caller stopped reading: free the batch slot
                runner.cancel(work.request_id)

    def cancel(self, request_id: str) -> bool:
        runner = self._runner
        return runner.cancel(request_id) if runner is not None else False

    # ---- reporting ----------------------------------------------------------------------------------
    def capabilities(self) -> BackendCapabilities:
        real_gpu = self.device.type == "cuda"
        device = "gpu" if real_gpu else (self.simulated_device or "cpu")
        return BackendCapabilities(
            name="torch",
            device=device,
            provider=str(self.device) if real_gpu else "cpu",
            precision=self.precision,
            max_batch_size=self.max_batch_size,
            context_length=self.context_length,
            simulated=self.simulated_device is not None and not real_gpu,
            kv_budget_bytes=self._kv_budget,
            kv_bytes_per_token=self.profile.kv_bytes_per_token(self.precision),
        )

    def health(self) -> BackendHealth:
        runner = self._runner
        if runner is None:
            return BackendHealth(False, 0, self._load_error or "not loaded; call load()")
        if not runner.alive:
            return BackendHealth(False, runner.active_count(), runner.last_error or "scheduler thread stopped")
        detail = f"{self.device} {self.precision}, batch <= {self.max_batch_size}"
        if runner.last_error:
            detail += f"; last error: {runner.last_error}"
        return BackendHealth(True, runner.active_count(), detail)

    def _require_loaded(self) -> TorchBackend:
        if self.model is None or self._runner is None:
            raise BackendError(f"the torch backend for {self.name} is not loaded; call load() first")
        return self


def _eos_ids(model: torch.nn.Module, tokenizer: object) -> frozenset[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for source in (gen_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return frozenset(ids)
