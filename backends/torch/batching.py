"""Iteration-level (continuous) batching for a transformers causal LM, on CUDA or the CPU.

Design (the simplest one that is exactly right):
- One scheduler thread owns the model (and, on CUDA, sets its device first, so work for cuda:1 never lands
  on GPU 0). `submit` puts a request on a queue; the thread answers through the request's own chunk queue.
  Nothing else touches the model, so no locks around forward passes.
- On CUDA, requests waiting to start are prefilled together (left-padded, one forward, their own
  DynamicCache, up to PREFILL_TOKENS padded tokens; a request alone runs unpadded), their first tokens are
  chosen from the prefill logits and streamed at once, then their KV cache is merged into the running
  batch. While streams are decoding, one such group is prefilled per step, so a burst of arrivals never
  stalls them for long. On the CPU each prompt is prefilled alone, all before the next step
  (`batched_prefill`: measured, a padded prefill only delays first tokens there).
- The running batch (kvbatch.py) is one left-padded DynamicCache with a 2-D attention mask; every row
  carries its own position id, so rotary/absolute positions never see the padding. With no padding at
  all (prompts of equal length prefilled together, rows whose padding was cut) the mask is dropped, so a
  single stream runs exactly like plain `model.generate` and SDPA is free to take its mask-less kernels
  (flash / memory-efficient attention with grouped-query heads on CUDA; an explicit mask rules them out).
- A decode step feeds one token per row from device tensors, chooses every row's next token in one
  batched call (sampling.py: per-row settings and generators, penalty history on the device), and brings
  the tokens (-1 for a row whose logits were not finite) to the host in ONE transfer: the step's only
  host sync, unless a row asked for logprobs.
- A finished or cancelled row leaves at once; leading columns that became padding for every row are cut.
- Admission is the engine's: it submits a request only when a batch slot is free and the padded KV
  cache of the batch with it fits the budget (backends/memory.py); this loop runs what it is given.

Failure isolation (errors.py classifies): every step fails only the rows it concerns, and the shared
cache changes all or nothing (kvbatch.py).
- prefill, or joining the batch: only those requests fail (out of memory, a model error, non-finite logits);
  a group whose forward fails is prefilled again one by one, so that only the request that fails fails;
- a decode step's forward: the cache is rolled back; out of memory fails the newest row, any other error
  the rows of that step; the loop carries on;
- choosing tokens: a row whose logits are NaN/inf fails alone; if the batched choice raises, rows are
  chosen one by one so that only the row that raises fails;
- removing rows: out of memory while compacting fails the newest surviving row, then compacts again;
- an unrecoverable CUDA error (device-side assert, illegal address, no kernel image) stops the runner:
  every stream ends with the reason, `restart_required` says why, and the backend reports it as unhealthy.

transformers 4.57 ships its own continuous batching (`generate_batch`), but its memory probe assumes
CUDA and it fails on the CPU, so this loop is used on both devices; it is the one the tests exercise.
"""

from __future__ import annotations

import collections
import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from backends.base import SamplingParams, TokenLogprob
from backends.detok import StreamDecoder
from backends.runner import BatchRunnerBase
from backends.stream import TokenStream, token_logprob
from backends.torch import kvbatch as kv
from backends.torch.errors import OOM_ERRORS, RestartRequired, describe, is_fatal, is_oom
from backends.torch.sampling import BatchSampler, SamplerRow, make_generator

log = logging.getLogger(__name__)

__all__ = ["OOM_ERRORS", "BatchRunner", "Work", "make_work"]

PREFILL_TOKENS = 2048
"""Padded prompt tokens prefilled together in one forward; what does not fit waits for the next decode step."""

NON_FINITE = (
    "the model produced non-finite logits (NaN or inf) for this request, so no token could be chosen; "
    "this request was dropped and the backend carries on. fp16 overflows on some models: try bf16 or fp32"
)


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
    done: bool = False
    cancelled: bool = False

    @property
    def generated(self) -> list[int]:
        return self.stream.generated

    def banned(self) -> list[int]:
        return self.params.banned_ids(self.eos_ids, len(self.generated))


Decision = tuple[int | None, str | None]
"""Per row: (token, None), or (None, why this row failed)."""


class BatchRunner(BatchRunnerBase):
    """The scheduler thread: admits requests, prefills them, and runs shared decode steps."""

    thread_name = "torch-batch-scheduler"
    runtime = "the torch backend"

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        *,
        max_batch_size: int,
        on_oom: Callable[[], None] | None = None,
        batched_prefill: bool | None = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size)
        self.model = model
        self.device = device
        # CUDA: waiting prompts share one forward and one group starts per decode step. The CPU gains nothing
        # from a padded prefill (its GEMMs are already large; measured with bench_torch_batching, the median
        # time to first token of 16 streams got worse), so there each prompt is prefilled alone, all of them
        # before the next step, as before.
        self.batched_prefill = device.type == "cuda" if batched_prefill is None else batched_prefill
        self.on_oom = on_oom
        self.restart_required = ""  # set when an unrecoverable device error stopped the runner
        # running batch
        self.rows: list[Work] = []
        self._waiting: collections.deque[Work] = collections.deque()  # submitted, not yet prefilled
        self.batch: kv.KVBatch | None = None
        self.sampler: BatchSampler | None = None
        self._fast_logits_kwargs = _supports_logits_to_keep(model)

    def _check_accepting(self) -> None:
        if self.restart_required:
            raise RestartRequired(self.restart_required)

    # ---- scheduler thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # kernels, generators and allocations of this thread go there
            with torch.inference_mode():
                while not self._stopping:
                    self._admit()
                    if self._stopping:
                        break
                    self._drop_cancelled()
                    if self.rows:
                        self._step()
        except Exception as e:
            if is_fatal(e):
                cause = e.__cause__ if isinstance(e, RestartRequired) and e.__cause__ is not None else e
                self.restart_required = (
                    f"restart required: an unrecoverable error on {self.device} ({describe(cause)}) left its "
                    "context unusable; the torch backend stopped. Restart the process to use this device again"
                )
                self.last_error = self.restart_required
                log.error("%s", self.restart_required, exc_info=cause)
            else:  # a bug in the loop: end every stream with the reason rather than hang them
                log.exception("torch batch scheduler crashed")
                self.last_error = f"scheduler crashed: {describe(e)}"
            self._crashed(self.last_error)

    def _release(self) -> None:
        self.batch, self.sampler = None, None
        self._waiting.clear()

    def _admit(self) -> None:
        """Take what was submitted since the last step (block while there is nothing to run), then prefill:
        one group of waiting requests while streams are decoding (so that they never stall for long),
        every group when none is."""
        block = not self.rows and not self._waiting
        while not self._stopping:
            try:
                w = self._incoming.get(block=block)
            except queue.Empty:
                break
            block = False
            if w is None:
                return
            self._waiting.append(w)
        while self._waiting and not self._stopping:
            group = self._next_group()
            if group:
                self._prefill_and_join(group)
            if self.rows and self.batched_prefill:
                return

    def _next_group(self) -> list[Work]:
        """Waiting requests, oldest first, whose padded prompts fit PREFILL_TOKENS together (at least one)."""
        group: list[Work] = []
        longest = 0
        while self._waiting:
            w = self._waiting[0]
            if self._take_cancel(w.request_id):
                self._waiting.popleft()
                self._end(w, "cancelled")
                continue
            wider = max(longest, len(w.prompt_ids))
            if group and (not self.batched_prefill or wider * (len(group) + 1) > PREFILL_TOKENS):
                break
            group.append(self._waiting.popleft())
            longest = wider
        return group

    def _prefill_and_join(self, ws: list[Work]) -> None:
        """Prefill requests together (left-padded, one forward), stream their first tokens, and merge their
        caches into the batch. A failure fails these requests only and leaves the running batch as it was;
        when the group's forward fails, each is prefilled alone so that only the one that fails fails."""
        rows = [SamplerRow(w.params, w.generator, w.prompt_ids) for w in ws]
        try:
            if len({len(w.prompt_ids) for w in ws}) == 1:  # no padding: no mask, so SDPA keeps its fast paths
                ids, mask, positions = (
                    torch.tensor([w.prompt_ids for w in ws], dtype=torch.long).to(self.device),
                    None,
                    None,
                )
            else:
                ids, mask, positions = kv.prefill_inputs([w.prompt_ids for w in ws], self.device)
            cache = DynamicCache()
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                **self._fast_logits_kwargs,
            )
            raw = out.logits[:, -1, :]
            del out
            sampler = BatchSampler(rows, raw.shape[-1], self.device)
        except Exception as e:
            if len(ws) > 1 and not is_fatal(e):
                log.warning("prefilling %d requests together failed (%s); one by one instead", len(ws), describe(e))
                if is_oom(e) and self.on_oom is not None:
                    self.on_oom()
                for w in ws:
                    self._prefill_and_join([w])
                return
            self._request_failed(ws[0], f"prefill of {len(ws[0].prompt_ids)} prompt tokens", e)
            return
        decisions, _ = self._decide(raw, ws, sampler)
        logprob_rows = self._logprob_rows(raw, ws, decisions)
        keep = []
        for i, (w, (token, error)) in enumerate(zip(ws, decisions, strict=True)):
            if token is None:
                self._fail(w, error or NON_FINITE)
            elif not self._accept(w, token, raw, i, logprob_rows):
                keep.append(i)
                rows[i].history = [*w.prompt_ids, token]
        if not keep:
            return
        joiners = [ws[i] for i in keep]
        try:  # the sampler first: if the cache then fails to grow, merged() has put it back as it was
            joining = [rows[i] for i in keep]
            joined = (
                self.sampler.joined(joining)
                if self.sampler is not None
                else BatchSampler(joining, raw.shape[-1], self.device)
            )
            new = kv.group(cache, [len(w.prompt_ids) for w in ws], [t or 0 for t, _ in decisions])
            if len(keep) < len(ws):
                new = kv.selected(new, keep)
            batch = kv.merged(self.batch, new)
        except Exception as e:
            for w in joiners:
                self._request_failed(w, f"joining the running batch of {len(self.rows)} sequences", e)
            return
        self.batch, self.sampler = batch, joined
        self.rows.extend(joiners)
        self.peak_batch = max(self.peak_batch, len(self.rows))

    def _step(self) -> None:
        assert self.batch is not None and self.sampler is not None
        batch, rows = self.batch, self.rows
        try:
            mask = kv.step_mask(batch)
            out = self.model(
                input_ids=batch.next_ids.view(-1, 1),
                attention_mask=mask if any(batch.pads) else None,
                position_ids=batch.positions.view(-1, 1),
                past_key_values=batch.cache,
                use_cache=True,
            )
            raw = out.logits[:, -1, :]
            del out
        except Exception as e:
            if is_fatal(e):
                raise RestartRequired(describe(e)) from e
            kv.rollback(batch)  # layers that ran before the failure already appended a column
            where = f"a decode step with {len(rows)} sequences of {batch.length + 1} tokens"
            if is_oom(e):
                victim = len(rows) - 1  # the newest row pays; the older ones have waited longer
                self._request_failed(rows[victim], where, e)
                self._remove_rows([victim])
            else:  # one forward for all rows: they share the failure, the loop carries on
                log.exception("decode step failed")
                self.last_error = describe(e)
                for w in rows:
                    self._fail(w, f"{where} failed: {describe(e)}")
                self.rows, self.batch, self.sampler = [], None, None
            return
        self.steps += 1
        batch.mask = mask
        decisions, tokens = self._decide(raw, rows, self.sampler)
        if tokens is not None:
            batch.next_ids = tokens
        else:  # chosen row by row: failed rows leave below, their placeholder is never fed
            batch.next_ids = torch.tensor([t or 0 for t, _ in decisions], dtype=torch.long).to(self.device)
        batch.positions += 1
        finished = []
        logprob_rows = self._logprob_rows(raw, rows, decisions)
        for i, (w, (token, error)) in enumerate(zip(rows, decisions, strict=True)):
            if token is None:
                self._fail(w, error or NON_FINITE)
                finished.append(i)
            elif self._accept(w, token, raw, i, logprob_rows):
                finished.append(i)
        self._remove_rows(finished)

    def _decide(
        self, raw: torch.Tensor, rows: list[Work], sampler: BatchSampler
    ) -> tuple[list[Decision], torch.Tensor | None]:
        """Every row's next token, with ONE host transfer for the batch; when the batched choice raises,
        row by row so that only the row that raises fails. Returns the decisions and, from the batched path,
        the tokens on the device (the next step's input)."""
        try:
            tokens = sampler.choose(_suppress(raw, rows))
            host_tokens = torch.where(_finite_rows(raw), tokens, -1).tolist()
        except Exception as e:
            if is_fatal(e):
                raise RestartRequired(describe(e)) from e
            log.warning("batched token choice failed (%s); choosing row by row to isolate it", describe(e))
            decisions = [self._decide_row(raw, rows, sampler, i) for i in range(len(rows))]
            sampler.observe(torch.tensor([t or 0 for t, _ in decisions], dtype=torch.long).to(self.device))
            return decisions, None
        sampler.observe(tokens)
        return [(None, NON_FINITE) if token < 0 else (token, None) for token in host_tokens], tokens

    def _decide_row(self, raw: torch.Tensor, rows: list[Work], sampler: BatchSampler, i: int) -> Decision:
        try:
            one = raw[i : i + 1]
            token = int(torch.where(_finite_rows(one), sampler.selected([i]).choose(_suppress(one, [rows[i]])), -1))
            return (None, NON_FINITE) if token < 0 else (token, None)
        except Exception as e:
            if is_fatal(e):
                raise RestartRequired(describe(e)) from e
            log.warning("choosing a token failed for request %s: %s", rows[i].request_id, describe(e))
            return None, f"choosing the next token failed: {describe(e)}; this request was dropped"

    def _logprob_rows(self, raw: torch.Tensor, rows: list[Work], decisions: list[Decision]) -> dict[int, object]:
        """Raw logits of the rows that asked for logprobs, on the host in one transfer (none asked: nothing)."""
        want = [
            i
            for i, (w, (t, _)) in enumerate(zip(rows, decisions, strict=True))
            if t is not None and w.params.logprobs is not None
        ]
        if not want:
            return {}
        host = raw[torch.tensor(want, dtype=torch.long).to(raw.device)].float().cpu().numpy()
        return dict(zip(want, host, strict=True))

    def _accept(self, w: Work, token: int, raw: torch.Tensor, i: int, host_rows: dict | None = None) -> bool:
        """Stream a new token through the request's TokenStream; True when the request is finished (or failed)."""
        try:
            logprob: TokenLogprob | None = None
            if w.params.logprobs is not None:
                row = host_rows[i] if host_rows and i in host_rows else raw[i].float().cpu().numpy()
                logprob = token_logprob(row, token, w.params.logprobs)
            chunk = w.stream.push(token, logprob)
        except Exception as e:  # e.g. the tokenizer cannot decode an id the model produced
            log.warning("streaming token %d failed for request %s: %s", token, w.request_id, describe(e))
            self._fail(w, f"streaming token {token} failed: {describe(e)}; this request was dropped")
            return True
        if chunk.finish_reason is not None:
            self._finish(w, chunk)
            return True
        w.out.put(chunk)
        return False

    def _request_failed(self, w: Work, where: str, e: BaseException) -> None:
        """One request failed during `where`: end it with the reason; an unrecoverable error stops the runner."""
        if is_fatal(e):
            raise RestartRequired(describe(e)) from e
        if is_oom(e):
            msg = (
                f"out of memory on {self.device} during {where}; this request was dropped and the backend carries "
                "on. Retry with a shorter prompt or max_new_tokens, or lower max_batch_size / memory_limit_bytes"
            )
            log.warning("%s (%s)", msg, e)
            if self.on_oom is not None:
                self.on_oom()
        else:
            log.warning("request %s failed during %s", w.request_id, where, exc_info=e)
            msg = f"{where} failed: {describe(e)}"
        self._fail(w, msg)

    def _remove_rows(self, indices: list[int]) -> None:
        """Drop finished rows from the batch, all or nothing; if building the smaller batch runs out of memory,
        the newest surviving row is failed too and the smaller batch is built again."""
        if not indices:
            return
        assert self.batch is not None and self.sampler is not None
        drop = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in drop]
        while keep:
            try:
                sampler = self.sampler.selected(keep)
                batch = kv.selected(self.batch, keep)
                break
            except Exception as e:
                victim = keep.pop()
                self._request_failed(self.rows[victim], f"compacting the batch to {len(keep) + 1} sequences", e)
        if not keep:
            self.rows, self.batch, self.sampler = [], None, None
            return
        self.batch, self.sampler = batch, sampler
        self.rows = [self.rows[i] for i in keep]


def _finite_rows(raw: torch.Tensor) -> torch.Tensor:
    """[B] bool: False where a row's logits hold a NaN or +inf, or are all -inf (no token can be chosen).
    One reduction: amax propagates NaN."""
    return torch.isfinite(raw.amax(-1))


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
