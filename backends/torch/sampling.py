"""Per-request next-token choice for the batched decode loop: greedy or seeded sampling, HF semantics.

Each row of a batch has its own SamplingParams and its own torch.Generator, so one request's seed never
depends on what else shares the batch. The operations mirror transformers' logits processors
(RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper).
"""

from __future__ import annotations

import torch

from backends.base import SamplingParams


def needs_processing(params: SamplingParams) -> bool:
    """False when a plain argmax over the raw logits gives the answer (the fast, batched path)."""
    return not params.is_greedy or params.repetition_penalty != 1.0


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) scores of already-seen tokens by `penalty`, as transformers does."""
    if penalty == 1.0 or seen_ids.numel() == 0:
        return logits
    scores = logits.gather(-1, seen_ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(-1, seen_ids, scores)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set scores outside the top-k / nucleus to -inf; the most likely token always survives."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        remove_sorted = mass_before > top_p
        remove_sorted[..., 0] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def choose_token(
    logits: torch.Tensor,
    params: SamplingParams,
    seen_ids: torch.Tensor | None,
    generator: torch.Generator | None,
) -> int:
    """Pick the next token from one row of logits (shape [vocab]) under `params`."""
    logits = logits.float()
    if seen_ids is not None:
        logits = apply_repetition_penalty(logits, seen_ids, params.repetition_penalty)
    if params.is_greedy:
        return int(logits.argmax(-1))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator of the request's own: seeded when asked (reproducible), else from OS entropy."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
