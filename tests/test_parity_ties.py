"""fp32 parity: a greedy continuation that parts from torch's at a tie (fp32 rounding) is not an exporter bug."""

from __future__ import annotations

import numpy as np

from plugin.convert.parity import TIE_TOLERANCE, parting_gap, until_stop


def _logits(rows: int, vocab: int = 8) -> np.ndarray:
    return np.zeros((rows, vocab), dtype=np.float32)


def test_the_gap_is_read_where_the_continuations_part():
    ref = _logits(4)
    ref[1, 3], ref[1, 5] = 2.0, 2.0 - 5e-7  # row 1 predicts token 2
    assert parting_gap([1, 2, 3, 4], [1, 2, 5, 4], ref) < TIE_TOLERANCE
    ref[1, 5] = 1.0
    assert parting_gap([1, 2, 3, 4], [1, 2, 5, 4], ref) == 1.0


def test_no_gap_when_they_do_not_part_at_a_token_both_chose():
    ref = _logits(4)
    assert parting_gap([1, 2, 3], [1, 2, 3], ref) is None  # identical
    assert parting_gap([1, 2, 3, 4], [1, 2, 3], ref) is None  # one stopped early: not a tie
    assert parting_gap([1, 2], [7, 2], ref) is None  # the prompt itself differs


def test_continuations_are_compared_up_to_their_stop_token():
    # transformers keeps EOS in a sequence, onnxruntime-genai leaves it out: equal once both are cut before it
    stop = frozenset({2})
    assert until_stop([5, 6, 7, 2], 3, stop) == until_stop([5, 6, 7], 3, stop) == [5, 6, 7]
    assert until_stop([2, 6, 7, 9, 2, 4], 1, stop) == [2, 6, 7, 9]  # a stop id inside the prompt stays
    assert until_stop([5, 6, 7, 8], 3, stop) == [5, 6, 7, 8]


def test_a_stop_against_a_token_is_a_tie_only_when_torch_scores_them_alike():
    ref = _logits(4)
    ref[2, 2], ref[2, 6] = 3.0, 3.0 - 2e-6  # row 2 predicts the token after [5, 6, 7]
    stop = frozenset({2})
    # torch stopped, onnxruntime-genai went on with token 6
    assert parting_gap([5, 6, 7], [5, 6, 7, 6], ref, stop) < TIE_TOLERANCE
    assert parting_gap([5, 6, 7], [5, 6, 7, 6], ref) is None  # without stop ids: a plain early stop
    ref[2, 6] = 0.5
    assert parting_gap([5, 6, 7, 6], [5, 6, 7], ref, stop) == 2.5
