"""An audit of one decode step of the torch batching loop: host syncs, uploads and ops outside the model.

On a GPU each device-to-host read stalls the host until every queued kernel has run, so a step must read
the device once (the batch's tokens), whatever the mix of greedy, sampled and penalised rows, and must
not rebuild its inputs from Python lists. The runner is driven on this thread (benchmarks/step_audit.py).
"""

from __future__ import annotations

import pytest
import torch

from backends.base import GenerationRequest, SamplingParams
from backends.torch import batching
from backends.torch.backend import TorchBackend
from benchmarks.step_audit import admitted_runner, audit_steps

PROMPTS = ["Hello", "The capital of France is", "def main():\n    return", "Numbers: 0 1 2 3", "naïve café", "Hi"]
GREEDY = SamplingParams(max_new_tokens=100)
SAMPLED = SamplingParams(max_new_tokens=100, temperature=0.9, top_k=20, top_p=0.9, seed=1)
PENALISED = SamplingParams(max_new_tokens=100, temperature=0.7, repetition_penalty=1.3, seed=2)
PENALISED_GREEDY = SamplingParams(max_new_tokens=100, repetition_penalty=1.2)
WITH_LOGPROBS = SamplingParams(max_new_tokens=100, logprobs=3)


@pytest.fixture(scope="module")
def backend(tiny_model_factory):
    b = TorchBackend(tiny_model_factory("llama"), device="cpu")
    b.load()
    yield b
    b.unload()


def audit(backend: TorchBackend, params: list[SamplingParams], steps: int = 5) -> dict[str, float]:
    works = []
    for i, p in enumerate(params):
        ids = backend.prompt_ids(GenerationRequest(prompt=PROMPTS[i % len(PROMPTS)], sampling=p))
        works.append(batching.make_work(f"a{i}", ids, p, frozenset(), backend._encoder.decoder(ids), backend.device))
    runner = admitted_runner(batching, backend.model, backend.device, works)
    with torch.inference_mode():
        runner._step()  # the first step after a join is like any other, but keep the audit to steady ones
    result = audit_steps(runner, steps)
    assert result["steps"] == steps, "every row must still be running during the audit"
    return result


@pytest.mark.parametrize(
    "mix",
    [[GREEDY], [GREEDY] * 4, [GREEDY, SAMPLED, PENALISED, PENALISED_GREEDY], [SAMPLED] * 6],
    ids=["one-greedy", "four-greedy", "mixed", "six-sampled"],
)
def test_one_host_sync_and_no_uploads_per_decode_step(backend, mix):
    result = audit(backend, mix)
    assert result["host_syncs"] == 1  # the batch's tokens (with the non-finite flags), in one transfer
    assert result["uploads"] == 0  # inputs, positions and penalty history stay on the device


def test_a_row_with_logprobs_adds_one_transfer_for_the_batch(backend):
    assert audit(backend, [GREEDY, WITH_LOGPROBS, WITH_LOGPROBS])["host_syncs"] == 2


def test_greedy_rows_cost_no_ops_per_row(backend):
    """The batch's ops do not grow with its greedy rows: one batched choice, not a loop over rows."""
    assert audit(backend, [GREEDY] * 2)["ops"] == audit(backend, [GREEDY] * 6)["ops"]


def test_a_sampled_row_costs_one_op_of_its_own(backend):
    """Its own generator draws its noise (one op per sampled row); everything else is batched."""
    two, five = audit(backend, [SAMPLED] * 2)["ops"], audit(backend, [SAMPLED] * 5)["ops"]
    assert five - two == 3
