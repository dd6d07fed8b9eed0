"""The GPU path: a transformers causal LM on CUDA (bf16/fp16) or on the CPU (fp32) as the floor.

Concurrent `generate()` calls share decode steps through one scheduler thread (see batching.py for
the design). This module owns what surrounds it: choosing the device and precision, refusing models
that do not fit, turning a request into prompt ids (chat template or raw prompt), and the streams.

On CUDA the device and precision are those of the placement, checked against that very GPU: bf16 only at
compute capability >= 8.0 of that device (earlier GPUs would emulate it), else fp16; a GPU whose
architecture the installed torch build has no kernels for is refused at once with the reason, instead of
failing later with "no kernel image is available". Weights load straight onto the device. Memory is
reserved in the process's one ledger for the device (backends/memory.py) before loading.

What runs is reported as it is: provider "cuda:N" only when the weights really are on that GPU, "cpu"
otherwise. A simulated GPU (simulated_device="gpu") runs on the CPU and says so (simulated=True).
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import weakref
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
from backends.memory import (
    LOAD_KV_TOKENS,
    LedgerError,
    MemoryLedger,
    Reservation,
    activation_bytes,
    cuda_memory,
    gpu_ledger,
    host_ledger,
    host_memory,
    kv_transient_fraction,
)
from backends.profile import ModelProfile, profile_from_config
from backends.prompt import PromptEncoder
from backends.torch.batching import BatchRunner, Work, make_work
from backends.torch.errors import RestartRequired, describe, is_fatal

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


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
    """'auto' -> bf16 on a GPU of compute capability >= 8.0, else fp16; fp32 on the CPU. bf16 asked for on an
    earlier GPU runs as fp16 (torch would emulate bf16 there, slowly), with a warning."""
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be one of 'auto', 'fp32', 'fp16', 'bf16' (got {dtype!r})")
    d = _DTYPE_ALIASES.get(dtype.strip().lower(), dtype.strip().lower())
    if d != "auto" and d not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'fp32', 'fp16' or 'bf16'")
    if device.type == "cuda":
        native_bf16 = gpu_has_bf16(device)
        if d == "auto":
            return "bf16" if native_bf16 else "fp16"
        if d == "bf16" and not native_bf16:
            major, minor = torch.cuda.get_device_capability(device)
            log.warning(
                "%s has compute capability %d.%d: no native bf16 (it arrived with 8.0), so fp16 is used instead",
                device,
                major,
                minor,
            )
            return "fp16"
        return d
    if d == "auto":
        return "fp32"
    if d == "fp16":
        log.warning("fp16 on the CPU is slow and less accurate than fp32/bf16; consider dtype='fp32' or 'bf16'")
    return d


def gpu_has_bf16(device: torch.device) -> bool:
    """Native bf16 on this GPU: compute capability >= 8.0 of *this* device (torch.cuda.is_bf16_supported asks
    the current device and counts emulation). ROCm builds answer through torch's own check."""
    if getattr(torch.version, "hip", None):
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return torch.cuda.get_device_capability(device)[0] >= 8


def check_architecture(device: torch.device) -> None:
    """Refuse a GPU whose architecture the installed torch build has no kernels (nor PTX to compile) for."""
    arch_list = list(torch.cuda.get_arch_list())
    if not arch_list or getattr(torch.version, "hip", None):
        return  # unknown (or ROCm, which names archs differently): the first kernel will tell
    major, minor = torch.cuda.get_device_capability(device)
    if _arch_supported(major, minor, arch_list):
        return
    raise BackendError(
        f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor}) is not supported by "
        f"this torch build, which has kernels for {', '.join(arch_list)}; every kernel would fail with 'no kernel "
        "image is available'. Install a torch build that supports this GPU, or use another device"
    )


def _arch_supported(major: int, minor: int, arch_list: list[str]) -> bool:
    """A cubin sm_XY runs on capability X.Z for Z >= Y (same major); PTX compute_XY JIT-compiles for any
    capability >= X.Y; an arch-specific cubin (sm_90a) runs only on its own capability."""
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        digits = number.rstrip("abcdefghijklmnopqrstuvwxyz")
        if len(digits) < 2 or not digits.isdigit():
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and digits != number:
            ok = built == (major, minor)  # arch-specific features: that capability only
        elif kind == "sm":
            ok = built[0] == major and built[1] <= minor
        else:
            ok = kind == "compute" and built <= (major, minor)
        if ok:
            return True
    return False


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of the device right now: CUDA's own count, or available system RAM for the CPU."""
    return device_memory(device)[0]


def device_memory(device: torch.device) -> tuple[int, int, int]:
    """(free, total, held by this process) on the device now: CUDA's counts and the caching allocator's
    reserved bytes on a GPU; available and total RAM and this process's resident set on the CPU."""
    return cuda_memory(device.index or 0) if device.type == "cuda" else host_memory()


def device_ledger(device: torch.device) -> MemoryLedger:
    """The process's one memory ledger for this device (shared with every other backend and the engine)."""
    return gpu_ledger(device.index or 0) if device.type == "cuda" else host_ledger()


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
        if self.device.type == "cuda":
            check_architecture(self.device)
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
        self._reservation: Reservation | None = None
        self._release_on_gc: weakref.finalize | None = None
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
        """The memory this backend may reserve now: memory_limit_bytes when given, else what the device's
        ledger has left (live free memory minus headroom minus other backends' reservations)."""
        left = device_ledger(self.device).available() + (self._reservation.total if self._reservation else 0)
        return min(self.memory_limit_bytes, left) if self.memory_limit_bytes is not None else left

    def activation_allowance_bytes(self, kv_bytes: int | None = None) -> int:
        """Working memory beside weights and KV cache (backends/memory.py): prefill and sampling of a full
        batch, plus one layer's transient copy of a KV cache of `kv_bytes` (default: a full batch's)."""
        p = self.profile
        base = activation_bytes(
            hidden_size=p.hidden_size,
            vocab_size=p.vocab_size,
            element_bytes=torch.tensor([], dtype=DTYPES[self.precision]).element_size(),
            prefill_tokens=min(self.context_length, LOAD_KV_TOKENS),
            max_batch=self.max_batch_size,
        )
        kv = self._max_kv_bytes() if kv_bytes is None else kv_bytes
        return base + int(kv * kv_transient_fraction(p.num_layers))

    def _max_kv_bytes(self) -> int:
        """The most KV cache this backend can use: a full batch at full context."""
        return self.max_batch_size * self.context_length * self.profile.kv_bytes_per_token(self.precision)

    def _needs(self) -> tuple[int, int, int, int]:
        """(weights, activations beside the KV cache, KV of one sequence, KV of a full batch) in bytes."""
        per_token = self.profile.kv_bytes_per_token(self.precision)
        one_seq = min(self.context_length, LOAD_KV_TOKENS) * per_token
        weights = self.profile.weight_bytes(self.precision)
        return weights, self.activation_allowance_bytes(kv_bytes=0), one_seq, self._max_kv_bytes()

    def check_fits(self) -> None:
        """Raise BackendError when weights + activations + one sequence's KV cache exceed the budget."""
        weights, activations, one_seq, _ = self._needs()
        activations += int(one_seq * kv_transient_fraction(self.profile.num_layers))
        budget = self.memory_budget_bytes()
        if weights + activations + one_seq > budget:
            raise BackendError(self._does_not_fit(weights, activations, one_seq, budget))

    def _does_not_fit(self, weights: int, activations: int, one_seq: int, budget: int, detail: str = "") -> str:
        kv_tokens = min(self.context_length, LOAD_KV_TOKENS)
        where = "memory_limit_bytes" if self.memory_limit_bytes is not None else f"what {self.device} has left"
        return (
            f"{self.name} does not fit: it needs {_gib(weights + activations + one_seq)} at {self.precision} "
            f"(weights {_gib(weights)} + activations {_gib(activations)} + KV cache for {kv_tokens} tokens "
            f"{_gib(one_seq)}) but {where} is {_gib(budget)}{detail}. Use a smaller or quantized model, a lower "
            "precision (dtype='bf16'/'fp16'), another device, a smaller max_batch_size, or free memory"
        )

    def _reserve(self) -> Reservation:
        """Reserve weights + activations + as much KV cache as a full batch can use (at least one sequence)
        in the device's ledger; a memory_limit_bytes caps the whole reservation."""
        weights, activations, one_seq, max_kv = self._needs()
        transient = kv_transient_fraction(self.profile.num_layers)
        if self.memory_limit_bytes is not None:
            need = weights + activations + int(one_seq * (1 + transient))
            if need > self.memory_limit_bytes:
                raise BackendError(
                    self._does_not_fit(
                        weights, activations + int(one_seq * transient), one_seq, self.memory_limit_bytes
                    )
                )
            max_kv = min(max_kv, int((self.memory_limit_bytes - weights - activations) / (1 + transient)))
        book = device_ledger(self.device)
        try:
            reservation = book.reserve(
                self._owner,
                weights=weights,
                activations=activations,
                min_kv=one_seq,
                max_kv=max(max_kv, one_seq),
                kv_transient=transient,
            )
        except LedgerError as e:
            needed = activations + int(one_seq * transient)
            raise BackendError(self._does_not_fit(weights, needed, one_seq, book.available(), f" ({e})")) from e
        self._release_on_gc = weakref.finalize(self, book.release, self._owner)  # a backend dropped unloaded
        return reservation

    @property
    def reservation(self) -> Reservation | None:
        """What this backend holds in its device's memory ledger (None while not loaded)."""
        return self._reservation

    @property
    def _owner(self) -> str:
        return f"torch {self.name} {self.precision} #{id(self):x}"

    def _release(self) -> None:
        if self._release_on_gc is not None:
            self._release_on_gc()  # releases once, then detaches
            self._release_on_gc = None
        self._reservation = None

    def load(self) -> None:
        with self._load_lock:
            if self.model is not None:
                return
            self._reservation = self._reserve()
            try:
                self._load_reserved()
            except BaseException:
                self._release()
                raise

    def _load_reserved(self) -> None:
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)  # process-wide: torch has one intra-op pool
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, object] = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        if self.device.type == "cuda":
            kwargs["device_map"] = {"": self.device}  # straight onto the GPU, never staged whole in host RAM
        try:
            encoder = PromptEncoder.from_folder(self.folder, self.gguf_file, transformers=True)
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
            if self.device.type != "cuda":
                model.to(self.device)
        except torch.cuda.OutOfMemoryError as e:
            self._load_error = f"out of memory loading {self.name} on {self.device}"
            raise BackendError(f"{self._load_error}; use a smaller model or lower precision") from e
        except (OSError, ValueError, KeyError) as e:
            self._load_error = f"cannot load {self.name}: {type(e).__name__}: {e}"
            raise BackendError(self._load_error) from e
        except RuntimeError as e:
            if not is_fatal(e):
                raise
            self._load_error = f"restart required: {self.device} failed while loading {self.name} ({describe(e)})"
            raise BackendError(self._load_error) from e
        model.eval()
        model.requires_grad_(False)
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
        assert self._reservation is not None
        self._weight_bytes = weight_bytes
        self._kv_budget = self._reservation.kv
        self._runner = BatchRunner(model, self.device, max_batch_size=self.max_batch_size, on_oom=self._after_oom)
        self.model, self.tokenizer, self._encoder = model, tokenizer, encoder
        self._runner.start()
        self._load_error = ""
        log.info(
            "loaded %s on %s (%s, %s weights, KV budget %s, activations %s, batch <= %d)",
            self.name,
            self.device,
            self.precision,
            _gib(weight_bytes),
            _gib(self._kv_budget),
            _gib(self._reservation.activations),
            self.max_batch_size,
        )

    def _after_oom(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def unload(self) -> None:
        with self._load_lock:
            if self._runner is not None:
                self._runner.stop("the torch backend was unloaded while this request was running")
            broken = self._runner is not None and bool(self._runner.restart_required)
            self._runner, self.model, self.tokenizer, self._encoder = None, None, None, None
            gc.collect()
            if self.device.type == "cuda" and not broken:  # a broken context would only raise again
                torch.cuda.empty_cache()
            self._release()

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
        if runner.restart_required:
            raise BackendError(runner.restart_required)
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
        try:
            runner.submit(work)
        except RestartRequired as e:
            raise BackendError(str(e)) from e
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
        """Healthy while the batching thread runs; a stopped one says why, and whether only a new process can
        use the device again (an unrecoverable CUDA error). Request-level errors leave it healthy."""
        runner = self._runner
        if runner is None:
            return BackendHealth(False, 0, self._load_error or "not loaded; call load()")
        if runner.restart_required:
            return BackendHealth(False, runner.active_count(), runner.restart_required, restart_required=True)
        if not runner.alive:
            return BackendHealth(False, runner.active_count(), runner.last_error or "scheduler thread stopped")
        detail = f"{self.device} {self.precision}, batch <= {self.max_batch_size}"
        if runner.last_error:
            detail += f"; last request error: {runner.last_error}"
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
