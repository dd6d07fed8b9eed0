"""benchmarks/bench_ort_batching.py end to end on the tiny llama: every strategy, every field, correctness columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_ort_batching_quick_run_writes_every_field(accelserve_home: Path, tmp_path: Path) -> None:
    from benchmarks.bench_ort_batching import main

    out = tmp_path / "ort_batching.json"
    args = ["--model", "tiny", "--streams", "1", "3", "--repeats", "1", "--max-new-tokens", "6", "--generators"]
    assert main([*args, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["strategies"]) == {"generators", "batched", "og.Engine (full lm_head copy)"}
    assert "Got invalid dimensions for output: logits" in result["notes"]["og.Engine on the serving export"]
    for name, rows in result["strategies"].items():
        for n in ("1", "3"):
            row = rows[n]
            assert row["aggregate_tok_s"]["median"] > 0 and row["aggregate_tok_s"]["n"] == 1, name
            assert len(row["first_divergence"]) == int(n)
            assert 0 <= row["streams_equal_alone"] <= int(n)
            assert row["tpot_ms_p95"] >= row["tpot_ms_p50"] > 0
    # the tiny fp32 graph has no batch-dependent kernels: batched streams equal one generator at a time
    assert result["strategies"]["batched"]["3"]["streams_equal_alone"] == 3
    assert result["baseline"] == "generators" and result["strategies"]["generators"]["3"]["vs_baseline"] == 1.0
    # no int8-compute MatMulNBits in the fp32 graph: the rows kernel has nothing to serve, and says so
    assert "no int8-compute MatMulNBits" in result["notes"]["batched"]
