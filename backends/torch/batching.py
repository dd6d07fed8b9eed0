"""Iteration-level (continuous) batching for a transformers causal LM, on CUDA or the CPU.

Design (the simplest one that is exactly right):
- One scheduler thread owns the model. `submit` puts a request on a queue; the thread answers through
  the request's own chunk queue. Nothing else touches the model, so no locks around forward passes.
- A new request is prefilled alone (batch 1, no padding, its own DynamicCache), its first token is
  chosen from the prefill logits and streamed at once, then its KV cache is merged into the running
  batch before the next decode step.
- The running batch is one DynamicCache of shape [B, heads, L, head_dim] kept LEFT-padded: a row whose
  sequence is shorter than L has zero keys/values in its first columns, masked out by a 2-D attention
  mask [B, L]. Merging pads whichever side is shorter on the left and concatenates on the batch axis.
  Every row carries its own position id (its real token count), so rotary/absolute positions never
  see the padding; the mask hides it from attention. Each decode step feeds one token per row
  ([B, 1]) and appends one column to the mask. With no padding at all the mask is dropped, so a
  single stream runs exactly like plain `model.generate`.
- A finished or cancelled row leaves at once: its index is dropped from the cache and mask, then any
  leading columns that have become padding for every remaining row are cut off.
- Each row keeps its own SamplingParams, torch.Generator, stop matcher, detokenizer, EOS set and
  max_new_tokens. Greedy rows are decided by one batched argmax; only sampling rows take the per-row
  path.
- Admission is the engine's: it submits a request only when a batch slot is free and the padded KV
  cache of the batch with it fits the budget (backends/memory.py); this loop runs what it is given.
  An out-of-memory error in a forward pass rolls the cache back and fails one request (the one being
  prefilled, or the newest row of the batch) with an error chunk; the loop carries on with the rest.

transformers 4.57 ships its own continuous batching (`generate_batch`), but its memory probe assumes
CUDA and it fails on the CPU, so this loop is used on both devices; it is the one the tests exercise.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from backends.base import FinishReason, SamplingParams, TokenChunk, TokenLogprob
from backends.detok import StreamDecoder
from backends.stream import TokenStream, token_logprob
from backends.torch.sampling import choose_token, make_generator, needs_processing

log = logging.getLogger(__name__)

_LIVE_RUNNERS: weakref.WeakSet[BatchRunner] = weakref.WeakSet()


@atexit.register
def _stop_live_runners() -> None:
    """Join scheduler threads before the interpreter tears torch down under them."""
    for runner in list(_LIVE_RUNNERS):
        runner.stop("the process is exiting")


OOM_ERRORS: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)
if hasattr(torch, "OutOfMemoryError"):
    OOM_ERRORS = (torch.OutOfMemoryError, torch.cuda.OutOfMemoryError)


@dataclass
class Work:
    """One request in flight: its prompt, settings, token stream and output queue."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: TokenStream
    eos_ids: frozenset[int] = frozenset()
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    generator: torch.Generator | None = None
    position: int = 0  # position id of the next token fed to the model
    done: bool = False

    def __post_init__(self) -> None:
        self.position = len(self.prompt_ids)

    @property
    def generated(self) -> list[int]:
        return self.stream.generated

    def banned(self) -> list[int]:
        """Tokens this row may not sample now: EOS under ignore_eos, EOS and stop ids before min_tokens."""
        n, params = len(self.generated), self.params
        out = list(self.eos_ids) if params.ignore_eos or n < params.min_tokens else []
        return out + list(params.stop_token_ids) if n < params.min_tokens else out


class BatchRunner:
    """The scheduler thread: admits requests, prefills them, and runs shared decode steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        *,
        max_batch_size: int,
        on_oom: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.max_batch_size = max_batch_size  # what the engine admits at most; reported, not enforced here
        self.on_oom = on_oom
        self._incoming: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._known: dict[str, Work] = {}
        self._cancel: set[str] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.last_error = ""
        self.peak_batch = 0
        # running batch
        self.rows: list[Work] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, L] int64, 0 = padding
        self.pads: list[int] = []
        self._fast_logits_kwargs = _supports_logits_to_keep(model)

    # ---- public, any thread -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="torch-batch-scheduler", daemon=True)
        self._thread.start()
        _LIVE_RUNNERS.add(self)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, work: Work) -> None:
        with self._lock:
            if self._stopping:
                raise RuntimeError("the torch backend is unloading; load it again before generating")
            if work.request_id in self._known:
                raise ValueError(f"request_id {work.request_id!r} is already running; give each request its own id")
            self._known[work.request_id] = work
        self._incoming.put(work)

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            if request_id not in self._known:
                return False
            self._cancel.add(request_id)
        return True

    def active_count(self) -> int:
        with self._lock:
            return len(self._known)

    def stop(self, reason: str) -> None:
        """Stop the thread and end every open stream with an error chunk naming `reason`."""
        with self._lock:
            self._stopping = True
        self._incoming.put(None)
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)
        with self._lock:
            leftover = list(self._known.values())
        for w in leftover:
            self._end(w, "error", reason)
        self.rows, self.cache, self.mask, self.pads = [], None, None, []
        _LIVE_RUNNERS.discard(self)

    # ---- scheduler thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping:
                    self._admit()
                    if self._stopping:
                        break
                    self._drop_cancelled()
                    if self.rows:
                        self._step()
        except Exception as e:  # a bug in the loop: end every stream with the reason rather than hang them
            log.exception("torch batch scheduler crashed")
            self.last_error = f"scheduler crashed: {type(e).__name__}: {e}"
            with self._lock:
                self._stopping = True
                leftover = list(self._known.values())
            for w in leftover:
                self._end(w, "error", self.last_error)

    def _admit(self) -> None:
        """Prefill and join everything submitted since the last step (block while there is nothing to run)."""
        block = not self.rows
        while not self._stopping:
            try:
                w = self._incoming.get(block=block)
            except queue.Empty:
                return
            block = False
            if w is None:
                return
            if self._take_cancel(w.request_id):
                self._end(w, "cancelled")
                continue
            self._prefill_and_join(w)

    def _take_cancel(self, request_id: str) -> bool:
        with self._lock:
            if request_id in self._cancel:
                self._cancel.discard(request_id)
                return True
        return False

    def _drop_cancelled(self) -> None:
        if not self._cancel:
            return
        gone = [i for i, w in enumerate(self.rows) if self._take_cancel(w.request_id)]
        for i in gone:
            self._end(self.rows[i], "cancelled")
        self._remove_rows(gone)

    def _prefill_and_join(self, w: Work) -> None:
        ids = torch.tensor([w.prompt_ids], dtype=torch.long, device=self.device)
        cache = DynamicCache()
        try:
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, **self._fast_logits_kwargs)
        except OOM_ERRORS as e:
            self._oom(w, f"prefill of {len(w.prompt_ids)} prompt tokens", e)
            return
        except Exception as e:
            log.exception("prefill failed for request %s", w.request_id)
            self.last_error = f"{type(e).__name__}: {e}"
            self._end(w, "error", f"prefill failed: {type(e).__name__}: {e}")
            return
        raw = out.logits[:, -1, :]
        logits = _suppress(raw, [w])[0]
        token = self._choose(w, logits) if needs_processing(w.params) else int(logits.argmax(-1))
        if self._accept(w, token, _logprob(w, raw[0], token)):
            return
        self._join(w, out.past_key_values)
        self.peak_batch = max(self.peak_batch, len(self.rows))

    def _join(self, w: Work, cache: DynamicCache) -> None:
        new_len = len(w.prompt_ids)
        if self.cache is None or not self.rows:
            self.cache, self.rows, self.pads = cache, [w], [0]
            self.mask = torch.ones((1, new_len), dtype=torch.long, device=self.device)
            return
        assert self.mask is not None
        cur_len = self.mask.shape[1]
        total = max(cur_len, new_len)
        grow, new_pad = total - cur_len, total - new_len
        for layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
            k, v = layer.keys, layer.values
            if grow:
                k, v = F.pad(k, (0, 0, grow, 0)), F.pad(v, (0, 0, grow, 0))
            nk, nv = new_layer.keys, new_layer.values
            if new_pad:
                nk, nv = F.pad(nk, (0, 0, new_pad, 0)), F.pad(nv, (0, 0, new_pad, 0))
            layer.keys, layer.values = torch.cat([k, nk]), torch.cat([v, nv])
        new_row = torch.ones((1, total), dtype=torch.long, device=self.device)
        new_row[:, :new_pad] = 0
        mask = F.pad(self.mask, (grow, 0)) if grow else self.mask
        self.mask = torch.cat([mask, new_row])
        self.pads = [p + grow for p in self.pads] + [new_pad]
        self.rows.append(w)

    def _step(self) -> None:
        assert self.cache is not None and self.mask is not None
        rows = self.rows
        input_ids = torch.tensor([[w.generated[-1]] for w in rows], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([[w.position] for w in rows], dtype=torch.long, device=self.device)
        mask = torch.cat([self.mask, self.mask.new_ones((len(rows), 1))], dim=1)
        length = self.mask.shape[1]
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask if any(self.pads) else None,
                position_ids=position_ids,
                past_key_values=self.cache,
                use_cache=True,
            )
        except OOM_ERRORS as e:
            self.cache.crop(length)  # layers that ran before the failure already appended a column
            victim = len(rows) - 1
            self._oom(rows[victim], f"a decode step with {len(rows)} sequences of {length + 1} tokens", e)
            self._remove_rows([victim])
            return
        except Exception as e:
            log.exception("decode step failed")
            self.last_error = f"{type(e).__name__}: {e}"
            for w in rows:
                self._end(w, "error", f"decode step failed: {type(e).__name__}: {e}")
            self.rows, self.cache, self.mask, self.pads = [], None, None, []
            return
        self.cache = out.past_key_values
        self.mask = mask
        raw = out.logits[:, -1, :]
        logits = _suppress(raw, rows)
        greedy = logits.argmax(-1).tolist()
        finished = []
        for i, w in enumerate(rows):
            w.position += 1
            token = self._choose(w, logits[i]) if needs_processing(w.params) else greedy[i]
            if self._accept(w, token, _logprob(w, raw[i], token)):
                finished.append(i)
        self._remove_rows(finished)

    def _choose(self, w: Work, logits: torch.Tensor) -> int:
        seen = None
        if w.params.repetition_penalty != 1.0:
            seen = torch.tensor(w.prompt_ids + w.generated, dtype=torch.long, device=logits.device)
        return choose_token(logits, w.params, seen, w.generator)

    def _accept(self, w: Work, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Stream a new token through the request's TokenStream; return True when the request is finished."""
        chunk = w.stream.push(token, logprob)
        if chunk.finish_reason is not None:
            self._finish(w, chunk)
            return True
        w.out.put(chunk)
        return False

    def _oom(self, w: Work, where: str, e: BaseException) -> None:
        msg = (
            f"out of memory on {self.device} during {where}; this request was dropped and the backend carries on. "
            "Retry with a shorter prompt or max_new_tokens, or lower max_batch_size / memory_limit_bytes"
        )
        log.warning("%s (%s)", msg, e)
        self.last_error = msg
        if self.on_oom is not None:
            self.on_oom()
        self._end(w, "error", msg)

    def _end(self, w: Work, reason: FinishReason, error: str | None = None) -> None:
        """Finish a request for a reason other than its own tokens: cancelled, or an error."""
        if not w.done:
            self._finish(w, w.stream.end(reason, error))

    def _finish(self, w: Work, last: TokenChunk) -> None:
        if w.done:
            return
        w.done = True
        w.out.put(last)
        with self._lock:
            self._known.pop(w.request_id, None)
            self._cancel.discard(w.request_id)

    def _remove_rows(self, indices: list[int]) -> None:
        if not indices:
            return
        drop = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in drop]
        self.rows = [self.rows[i] for i in keep]
        self.pads = [self.pads[i] for i in keep]
        if not self.rows:
            self.cache, self.mask, self.pads = None, None, []
            return
        assert self.cache is not None and self.mask is not None
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        cut = min(self.pads)
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx, :, cut:]
            layer.values = layer.values[idx, :, cut:]
        self.mask = self.mask[idx, cut:]
        self.pads = [p - cut for p in self.pads]


def _logprob(w: Work, raw_logits: torch.Tensor, token: int) -> TokenLogprob | None:
    """The token's log-probability under the raw model output, when the request asked for logprobs."""
    if w.params.logprobs is None:
        return None
    return token_logprob(raw_logits.float().cpu().numpy(), token, w.params.logprobs)


def _suppress(logits: torch.Tensor, rows: list[Work]) -> torch.Tensor:
    """Last-position logits [B, vocab] with each row's banned tokens at -inf (a copy only when needed)."""
    bans = [(i, [t for t in w.banned() if t < logits.shape[-1]]) for i, w in enumerate(rows)]
    bans = [(i, ids) for i, ids in bans if ids]
    if not bans:
        return logits
    logits = logits.clone()
    for i, ids in bans:
        logits[i, ids] = float("-inf")
    return logits


def _supports_logits_to_keep(model: torch.nn.Module) -> dict[str, int]:
    """Ask for last-position logits only when the model's forward takes `logits_to_keep` (saves the lm_head)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def make_work(
    request_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_ids: frozenset[int],
    decoder: StreamDecoder,
    device: torch.device,
) -> Work:
    """Build the per-request state: its TokenStream, and its own generator when sampling."""
    generator = make_generator(params.seed, device) if not params.is_greedy else None
    stream = TokenStream(request_id, len(prompt_ids), params, eos_ids, decoder)
    return Work(
        request_id=request_id, prompt_ids=prompt_ids, params=params, stream=stream, eos_ids=eos_ids, generator=generator
    )
