"""The "a temperature below GREEDY_TEMPERATURE is greedy" rule lives in SamplingParams, so every backend applies
it: torch's batched sampler, onnxruntime-genai's generators (search options) and its batched CPU path. Each is
checked with temperature=1e-39, which validation accepts and which overflows to NaN if it is ever divided by."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.base import GREEDY_TEMPERATURE, SamplingParams
from backends.detok import StreamDecoder
from backends.ort_genai import batching as ort_batching
from backends.ort_genai.backend import search_options
from backends.torch.sampling import BatchSampler, SamplerRow, make_generator

TINY = SamplingParams(temperature=1e-39, top_p=0.9, top_k=5, seed=3)


@pytest.mark.parametrize(
    ("params", "greedy"),
    [
        (SamplingParams(), True),
        (SamplingParams(temperature=1e-39), True),
        (SamplingParams(temperature=GREEDY_TEMPERATURE / 2), True),
        (SamplingParams(temperature=GREEDY_TEMPERATURE), False),
        (SamplingParams(temperature=0.7), False),
        (SamplingParams(temperature=0.7, greedy=True), True),
    ],
)
def test_is_greedy_below_the_shared_threshold(params, greedy):
    assert params.is_greedy is greedy


def test_torch_sampler_takes_the_argmax_for_a_tiny_temperature():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9, 0.0], [3.0, 0.0, 0.5, 2.9, -2.0]])
    rows = [SamplerRow(TINY, None if TINY.is_greedy else make_generator(3, torch.device("cpu"))) for _ in range(2)]
    assert rows[0].generator is None  # greedy: no generator is even made
    tokens = BatchSampler(rows, logits.shape[-1], torch.device("cpu")).choose(logits)
    assert tokens.tolist() == [1, 0]


def test_ort_generators_decode_a_tiny_temperature_greedily():
    options = search_options(TINY, prompt_span=4)
    assert options["do_sample"] is False and options["top_k"] == 1 and options["temperature"] == 1.0
    assert search_options(SamplingParams(temperature=0.7), prompt_span=4)["do_sample"] is True


class _NoDecoder:
    def add(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def test_ort_batched_rows_take_the_argmax_for_a_tiny_temperature():
    decoder: StreamDecoder = _NoDecoder()
    work = ort_batching.make_work("r", [1, 2], TINY, frozenset(), decoder)
    assert work.rng is None
    logits = np.array([0.1, 2.0, -1.0, 1.9, 0.0], dtype=np.float32)
    assert ort_batching.choose(logits, work) == 1


@pytest.mark.parametrize(
    ("params", "generated", "banned"),
    [
        (SamplingParams(), 0, []),
        (SamplingParams(ignore_eos=True, max_new_tokens=8), 5, [2]),
        (SamplingParams(min_tokens=3, stop_token_ids=[7]), 2, [2, 7]),
        (SamplingParams(min_tokens=3, stop_token_ids=[7]), 3, []),
    ],
)
def test_one_banned_token_rule_for_every_runner(params, generated, banned):
    """EOS under ignore_eos; EOS and stop ids before min_tokens; nothing otherwise (both runners ask this)."""
    assert params.banned_ids(frozenset({2}), generated) == banned
