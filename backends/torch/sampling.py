"""Next-token choice for the whole batch in a few kernels, each row under its own settings and generator.

The operations mirror transformers' logits processors (RepetitionPenaltyLogitsProcessor,
TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper), batched:
- every row's settings live on the device as [B] tensors, so one step is the same few kernels whatever
  the mix of greedy and sampling rows, with no host round trip per row;
- the repetition-penalty history is a [B, vocab] mask on the device, updated from the sampled tokens
  without leaving the device (never re-uploaded from a Python list);
- a sampling row draws with its own torch.Generator, so its seed never depends on what else shares the
  batch: one uniform number per row, then inverse-CDF over the batch (searchsorted in the cumulative
  probabilities) is a draw from each row's categorical distribution;
- when every sampled row has a top-k, only max(top_k) candidates are ranked (topk, not a sort of the
  vocabulary); a top-p without a top-k needs the full sort, once for the batch;
- a temperature below GREEDY_TEMPERATURE is greedy (`SamplingParams.is_greedy`, the rule every backend
  applies): dividing logits by 1e-39 overflows to inf and softmax turns that into NaN.

Greedy rows are exact (argmax of the penalised logits); sampled tokens are reproducible per seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from backends.base import SamplingParams


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator of the request's own: seeded when asked (reproducible), else from OS entropy."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


@dataclass
class SamplerRow:
    """One request's settings as the sampler holds them (host values; uploaded once, at join)."""

    params: SamplingParams
    generator: torch.Generator | None
    history: Sequence[int] = ()  # prompt ids (and the first token), for the repetition penalty

    @property
    def greedy(self) -> bool:
        return self.params.is_greedy

    @property
    def penalised(self) -> bool:
        return self.params.repetition_penalty != 1.0


class BatchSampler:
    """The batch's sampling state on the device. Immutable in shape: `joined` and `selected` return new
    samplers (so the batching loop can commit them together with the cache, all or nothing); only
    `observe` updates in place."""

    def __init__(
        self, rows: list[SamplerRow], vocab_size: int, device: torch.device, *, build_history: bool = True
    ) -> None:
        self.rows = rows
        self.vocab_size = vocab_size
        self.device = device
        self.any_sampling = any(not r.greedy for r in rows)
        self.any_top_k = any(not r.greedy and r.params.top_k for r in rows)
        self.any_top_p = any(not r.greedy and r.params.top_p < 1.0 for r in rows)
        self.any_penalty = any(r.penalised for r in rows)
        sampled = [r for r in rows if not r.greedy]
        # every sampling row keeps at most its top-k: the choice can be made among max(top_k) candidates
        ks = [r.params.top_k for r in sampled if r.params.top_k]
        self.max_top_k = max(ks) if ks and len(ks) == len(sampled) else 0
        self.largest_top_k = max(ks, default=0)
        # one upload of every row's settings; [B] each
        settings = [
            (
                1.0 if r.greedy else r.params.temperature,
                float(r.params.top_k if not r.greedy and r.params.top_k else vocab_size),
                r.params.top_p if not r.greedy and r.params.top_p < 1.0 else float("inf"),
                r.params.repetition_penalty,
                1.0 if r.greedy else 0.0,
            )
            for r in rows
        ]
        table = torch.tensor(settings, dtype=torch.float32).reshape(len(rows), 5).to(device)
        self.temperature = table[:, 0:1]
        self.top_k_on = table[:, 1:2] < vocab_size
        self.top_k = table[:, 1:2].long().clamp_(1, vocab_size)
        self.top_p = table[:, 2:3]
        self.penalty = table[:, 3:4]
        self.greedy_mask = table[:, 4].bool()
        self.seen: torch.Tensor | None = None  # [B, vocab] bool, only while some row is penalised
        if self.any_penalty and build_history:
            self.seen = _history_mask(rows, vocab_size, device)

    @classmethod
    def empty(cls, vocab_size: int, device: torch.device) -> BatchSampler:
        return cls([], vocab_size, device)

    def __len__(self) -> int:
        return len(self.rows)

    # ---- shape changes (new samplers; the old one stays valid until the caller commits) ---------------
    def joined(self, rows: list[SamplerRow]) -> BatchSampler:
        """This batch plus `rows` at the end (the old rows keep the history they gathered on the device)."""
        new = BatchSampler([*self.rows, *rows], self.vocab_size, self.device, build_history=False)
        if new.any_penalty:
            old = self.seen
            if old is None:
                old = torch.zeros((len(self.rows), self.vocab_size), dtype=torch.bool, device=self.device)
            new.seen = torch.cat([old, _history_mask(rows, self.vocab_size, self.device)])
        return new

    def selected(self, keep: list[int]) -> BatchSampler:
        """Only the rows at `keep`, in that order."""
        new = BatchSampler([self.rows[i] for i in keep], self.vocab_size, self.device, build_history=False)
        if new.any_penalty and self.seen is not None:
            new.seen = self.seen[torch.tensor(keep, dtype=torch.long).to(self.device)]
        return new

    # ---- per step -------------------------------------------------------------------------------------
    def observe(self, tokens: torch.Tensor) -> None:
        """Add this step's tokens ([B] on the device) to the penalty history, on the device."""
        if self.seen is not None and len(tokens):
            self.seen.scatter_(1, tokens.view(-1, 1).clamp(0, self.vocab_size - 1), True)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token of every row ([B] int64 on the device) from logits [B, vocab]; no host sync."""
        x = logits.float()
        if self.seen is not None:
            penalised = torch.where(x < 0, x * self.penalty, x / self.penalty)
            x = torch.where(self.seen[:, : x.shape[-1]], penalised, x)
        greedy = x.argmax(-1)
        if not self.any_sampling:
            return greedy
        x = x / self.temperature
        candidates: torch.Tensor | None = None  # vocabulary ids of x's columns, when x is a subset
        if self.max_top_k and self.max_top_k < x.shape[-1]:  # every sampled row has a top-k: only candidates
            x, candidates = x.topk(self.max_top_k, dim=-1)  # sorted, most likely first
            x = _top_k(x, self.top_k.clamp(max=self.max_top_k))
            if self.any_top_p:
                x = _top_p(x, self.top_p)
        elif self.any_top_p:  # a nucleus needs the whole vocabulary in order
            x, candidates = x.sort(-1, descending=True)
            if self.any_top_k:
                x = _top_k(x, self.top_k)
            x = _top_p(x, self.top_p)
        elif self.any_top_k:  # some rows have a top-k, others sample from everything: thresholds only
            k = min(self.largest_top_k, x.shape[-1])
            kth = x.topk(k, dim=-1).values.gather(-1, self.top_k.clamp(max=k) - 1)
            x = x.masked_fill(self.top_k_on & (x < kth), float("-inf"))
        # inverse CDF: one uniform draw per sampled row, from that request's own generator
        cdf = x.softmax(-1).cumsum_(-1)
        draws = torch.zeros((len(self.rows), 1), device=x.device)
        for i, r in enumerate(self.rows):
            if not r.greedy:
                draws[i].uniform_(generator=r.generator)
        picked = torch.searchsorted(cdf, draws * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
        if candidates is not None:
            picked = candidates.gather(-1, picked)
        return torch.where(self.greedy_mask, greedy, picked.squeeze(-1))


def _history_mask(rows: list[SamplerRow], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(rows), vocab] bool: the tokens each penalised row has seen (its prompt and first token)."""
    seen = torch.zeros((len(rows), vocab_size), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids = [t for t in r.history if 0 <= t < vocab_size] if r.penalised else []
        if ids:
            seen[i, torch.tensor(ids, dtype=torch.long)] = True
    return seen.to(device)


def _top_k(sorted_x: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Scores (sorted, most likely first) below each row's k-th set to -inf; ties at the k-th score are kept,
    as transformers does."""
    kth = sorted_x.gather(-1, top_k - 1)
    return sorted_x.masked_fill(sorted_x < kth, float("-inf"))


def _top_p(sorted_x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Scores (sorted, most likely first) outside each row's nucleus set to -inf; the first always survives."""
    probs = sorted_x.softmax(-1)
    remove = (probs.cumsum(-1) - probs) > top_p
    remove[:, 0] = False
    return sorted_x.masked_fill(remove, float("-inf"))
