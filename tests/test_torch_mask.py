"""An attention mask is passed only when some row really has padding: prompts of equal length prefilled together,
and decode steps of a batch without padding, run mask-less (an explicit mask keeps SDPA off its fast fused
kernels on CUDA). Driven on a runner whose thread is not started, so each forward is the test's own."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from backends.base import SamplingParams
from backends.torch.batching import BatchRunner, make_work

CPU = torch.device("cpu")
PARAMS = SamplingParams(max_new_tokens=8)


class _NoDecoder:
    def add(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    m = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"), attn_implementation="sdpa")
    return m.eval().requires_grad_(False)


def runner_with_mask_log(model) -> tuple[BatchRunner, list[torch.Tensor | None]]:
    runner = BatchRunner(model, CPU, max_batch_size=8, batched_prefill=True)
    masks: list[torch.Tensor | None] = []
    inner = model.forward

    def forward(*args, **kwargs):
        masks.append(kwargs.get("attention_mask"))
        return inner(*args, **kwargs)

    runner.model = type("Logged", (), {"__call__": lambda self, *a, **k: forward(*a, **k)})()
    return runner, masks


def works(prompts: list[list[int]]) -> list:
    return [make_work(f"r{i}", p, PARAMS, frozenset(), _NoDecoder(), CPU) for i, p in enumerate(prompts)]


def alone(model, prompt: list[int], steps: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_equal_prompts_prefill_and_decode_without_a_mask(model):
    runner, masks = runner_with_mask_log(model)
    prompts = [[5, 9, 13, 2, 7], [3, 3, 8, 21, 4]]
    ws = works(prompts)
    runner._prefill_and_join(ws)
    for _ in range(3):
        runner._step()
    assert masks == [None] * 4  # one prefill of both rows, three decode steps
    assert [w.generated for w in ws] == [alone(model, p, 4) for p in prompts]


def test_a_padded_batch_passes_a_mask_until_its_padding_is_cut(model):
    runner, masks = runner_with_mask_log(model)
    prompts = [[5, 9, 13, 2, 7, 11, 6], [3, 3, 8]]
    ws = works(prompts)
    runner._prefill_and_join(ws)
    runner._step()
    assert masks[0] is not None and masks[1] is not None  # the shorter prompt is left-padded
    runner._remove_rows([0])  # the longer row leaves: the short row's padding columns are cut
    assert runner.batch is not None and runner.batch.pads == [0]
    runner._step()
    assert masks[2] is None
    assert ws[1].generated == alone(model, prompts[1], 3)
