"""fp32 parity: a greedy continuation that parts from torch's at a tie (fp32 rounding) is not an exporter bug."""

from __future__ import annotations

import numpy as np

from plugin.convert.parity import TIE_TOLERANCE, parting_gap


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
