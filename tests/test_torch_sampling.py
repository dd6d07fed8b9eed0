"""The batched sampler draws from the distribution transformers' processors define, row by row: frequencies
over many draws match softmax(logits / temperature) after top-k, top-p and the repetition penalty, each row
under its own settings and generator, whatever shares its batch."""

from __future__ import annotations

import pytest
import torch

from backends.base import SamplingParams
from backends.torch.sampling import BatchSampler, SamplerRow, make_generator

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
STEPS = 5


def frequencies(params: list[SamplingParams], history: tuple[int, ...] = (), copies: int = 800) -> torch.Tensor:
    """[len(params), vocab] empirical frequencies: each setting as `copies` rows (own seeds) of one batch,
    over STEPS steps."""
    cpu = torch.device("cpu")
    rows = [
        SamplerRow(p, make_generator(i * copies + j, cpu), history) for i, p in enumerate(params) for j in range(copies)
    ]
    sampler = BatchSampler(rows, LOGITS.numel(), cpu)
    logits = LOGITS.repeat(len(rows), 1)
    counts = torch.zeros(len(rows), LOGITS.numel())
    for _ in range(STEPS):
        counts[torch.arange(len(rows)), sampler.choose(logits)] += 1
    return counts.view(len(params), copies, -1).sum(1) / (copies * STEPS)


def reference(temperature: float, top_k: int = 0, top_p: float = 1.0, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    """transformers' warpers (temperature, top-k, top-p), written out for one row."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    x = logits[None].clone()
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    return x.softmax(-1)[0]


@pytest.mark.parametrize(
    "settings",
    [
        [{"temperature": 1.0}, {"temperature": 0.5, "top_k": 3}, {"temperature": 2.0, "top_p": 0.8}],
        [{"temperature": 0.7, "top_k": 2}, {"temperature": 1.3, "top_k": 4, "top_p": 0.9}],
        [{"temperature": 1.0, "top_p": 0.7}, {"temperature": 1.0}],
        [{"temperature": 1.0, "top_k": 3}, {"temperature": 1.0}],
    ],
    ids=["all-kinds", "all-with-top-k", "top-p-and-plain", "top-k-and-plain"],
)
def test_each_row_draws_from_its_own_distribution(settings):
    params = [SamplingParams(max_new_tokens=1, seed=0, **s) for s in settings]
    got = frequencies(params)
    for row, s in zip(got, settings, strict=True):
        want = reference(s["temperature"], s.get("top_k", 0), s.get("top_p", 1.0))
        assert torch.allclose(row, want, atol=0.03), (s, row, want)
        assert (row[want == 0] == 0).all()  # never a token outside the top-k / nucleus


def test_greedy_rows_beside_sampled_ones_take_the_argmax_and_the_penalty():
    greedy, penalised = SamplingParams(max_new_tokens=1), SamplingParams(max_new_tokens=1, repetition_penalty=4.0)
    got = frequencies(
        [greedy, SamplingParams(max_new_tokens=1, temperature=1.0, seed=3), penalised], history=(0,), copies=20
    )
    assert got[0, 0] == 1.0
    assert got[2, 1] == 1.0  # token 0 (2.0 / 4 = 0.5) now loses to token 1 (1.0)
    assert got[1, 0] < 1.0  # the sampled row really samples


def test_the_same_seed_draws_the_same_tokens_in_any_batch():
    cpu = torch.device("cpu")
    params = SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.95, seed=7)

    def draws(neighbours: int) -> list[int]:
        rows = [SamplerRow(params, make_generator(7, cpu))]
        rows += [SamplerRow(SamplingParams(max_new_tokens=1, temperature=0.8, top_k=2), make_generator(1, cpu))]
        rows = rows[: 1 + neighbours]
        sampler = BatchSampler(rows, LOGITS.numel(), cpu)
        return [int(sampler.choose(LOGITS.repeat(len(rows), 1))[0]) for _ in range(50)]

    assert draws(0) == draws(1)
