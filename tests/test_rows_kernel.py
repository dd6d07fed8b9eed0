"""The rows kernel (backends/ort_genai/kernels): MatMulNBits' product for several rows at once.

Checked against an exact numpy model of the same arithmetic (A quantized per block to int8, B's 4-/8-bit
values, scales and zero points), against onnxruntime's own MatMulNBits, and for the property batching relies
on: a row's result is bit-identical whatever rows share its call. Then through the batched backend on a tiny
int4 export: shared decode steps give each request exactly the tokens it gets alone. Needs AVX-512 VNNI and
a C++ compiler; without them the backend keeps onnxruntime's kernels, which the last tests check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backends.base import GenerationRequest, SamplingParams
from backends.ort_genai import kernels
from backends.ort_genai.backend import OrtGenaiBackend

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

KERNEL = kernels.rows_kernel()
needs_kernel = pytest.mark.skipif(KERNEL.library is None, reason=f"rows kernel unavailable: {KERNEL.reason}")


def quantized_weights(rng, K: int, N: int, bits: int, block: int, zero_points: bool):
    """MatMulNBits' inputs for random weights: B [N, blocks, block*bits/8], scales [N, blocks], zero points."""
    blocks = -(-K // block)
    levels = 1 << bits
    q = rng.integers(0, levels, size=(N, blocks * block), dtype=np.uint8)
    scales = (rng.random((N, blocks), dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    zp = rng.integers(0, levels, size=(N, blocks), dtype=np.uint8) if zero_points else None
    if bits == 4:
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(N, blocks, block // 2)
        zp_packed = None
        if zp is not None:
            padded = np.zeros((N, blocks + blocks % 2), dtype=np.uint8)
            padded[:, :blocks] = zp
            zp_packed = (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)
    else:
        packed, zp_packed = q.reshape(N, blocks, block), zp
    zero = zp if zp is not None else np.full((N, blocks), levels // 2, dtype=np.uint8)
    return q, scales, zero, packed, zp_packed


def matmulnbits_model(K, N, bits, block, packed, scales, zp_packed, op="MatMulNBits", domain="com.microsoft"):
    inits = [
        onnx.numpy_helper.from_array(packed, "B"),
        onnx.numpy_helper.from_array(scales.reshape(-1), "scales"),
    ]
    inputs = ["A", "B", "scales"]
    if zp_packed is not None:
        inits.append(onnx.numpy_helper.from_array(zp_packed.reshape(-1), "zp"))
        inputs.append("zp")
    attrs = {"K": K, "N": N, "bits": bits, "block_size": block}
    if op == "MatMulNBits":
        attrs["accuracy_level"] = 4
    node = helper.make_node(op, inputs, ["Y"], domain=domain, **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "seq", N])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def session(model, library: Path | None = None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library is not None:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def reference(a: np.ndarray, q, scales, zero, K: int, block: int) -> np.ndarray:
    """The kernel's arithmetic in float64: per-block int8 A (round half to even), exact integer dot products."""
    rows = a.reshape(-1, K).astype(np.float32)
    blocks = scales.shape[1]
    padded = np.zeros((rows.shape[0], blocks * block), dtype=np.float32)
    padded[:, :K] = rows
    ablocks = padded.reshape(rows.shape[0], blocks, block)
    amax = np.abs(ablocks).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    qa = np.clip(np.rint(ablocks * inv[..., None]), -127, 127).astype(np.int64)
    ascale = (amax / np.float32(127)).astype(np.float64)
    qb = q.astype(np.int64).reshape(q.shape[0], blocks, block)  # [N, blocks, block]
    dots = np.einsum("mbk,nbk->mnb", qa, qb)  # exact integers
    sums = qa.sum(-1)  # [M, blocks]
    corrected = dots - zero.astype(np.int64)[None, :, :] * sums[:, None, :]
    out = (corrected * scales.astype(np.float64)[None] * ascale[:, None, :]).sum(-1)
    return out.reshape(*a.shape[:-1], -1)


CASES = [  # K, N, bits, block, zero points
    (576, 960, 4, 32, True),
    (576, 200, 4, 32, False),  # N not a multiple of the 16-column group; symmetric (default zero point 8)
    (100, 50, 4, 16, True),  # K not a multiple of the block
    (256, 64, 4, 128, True),
    (576, 300, 8, 32, True),  # the 8-bit lm_head format
    (96, 40, 8, 64, False),
]


def test_kernel_builds_wherever_the_cpu_and_a_compiler_allow() -> None:
    """The other tests skip without the kernel; a build that fails on a capable machine must not hide there."""
    if kernels.missing_cpu_features(kernels.cpu_flags()) or kernels.compiler() is None:
        pytest.skip(KERNEL.reason)
    assert KERNEL.library is not None and KERNEL.library.is_file(), KERNEL.reason


@needs_kernel
@pytest.mark.parametrize(("K", "N", "bits", "block", "zps"), CASES)
def test_kernel_computes_the_quantized_product_and_rows_do_not_interact(K, N, bits, block, zps) -> None:
    rng = np.random.default_rng(K * N + bits)
    q, scales, zero, packed, zp_packed = quantized_weights(rng, K, N, bits, block, zps)
    retyped = matmulnbits_model(K, N, bits, block, packed, scales, zp_packed, kernels.OP_TYPE, kernels.DOMAIN)
    rows = session(retyped, KERNEL.library)
    mlas = session(matmulnbits_model(K, N, bits, block, packed, scales, zp_packed))
    a = rng.standard_normal((3, 11, K)).astype(np.float32)  # 33 rows: tiles of 8 and a remainder
    a[0, 0, :] = 0.0  # an all-zero row: scale 0, no division by zero
    got = rows.run(None, {"A": a})[0]
    want = reference(a, q, scales, zero, K, block)
    scale = np.abs(want).max()
    assert got.shape == (3, 11, N)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)
    assert np.all(got[0, 0] == 0.0)
    # onnxruntime's MatMulNBits (int8 compute) does the same arithmetic in another order
    np.testing.assert_allclose(got, mlas.run(None, {"A": a})[0], rtol=0, atol=1e-3 * scale)
    # a row alone and the same row among others: bit-identical, whatever the tile it lands in
    flat = a.reshape(1, -1, K)
    together = rows.run(None, {"A": flat})[0][0]
    for i in (0, 5, 8, 17, 32):
        alone = rows.run(None, {"A": flat[:, i : i + 1]})[0][0, 0]
        assert np.array_equal(alone, together[i])


@needs_kernel
def test_rewrite_retypes_only_int8_compute_nodes(tmp_path: Path) -> None:
    from backends.ort_genai.kernels.rewrite import retype

    rng = np.random.default_rng(0)
    _, scales, _, packed, zp_packed = quantized_weights(rng, 64, 32, 4, 32, True)
    model = matmulnbits_model(64, 32, 4, 32, packed, scales, zp_packed)
    fp32_compute = onnx.ModelProto.FromString(model.SerializeToString())
    for a in fp32_compute.graph.node[0].attribute:
        if a.name == "accuracy_level":
            a.i = 0  # the lean preset's fp32-compute MLP keeps onnxruntime's kernel and numerics
    assert retype(fp32_compute) == 0 and fp32_compute.graph.node[0].op_type == "MatMulNBits"
    placeholder = onnx.ModelProto.FromString(model.SerializeToString())
    placeholder.graph.node[0].input.extend(["", ""])  # zero points and g_idx named absent
    placeholder.graph.node[0].input[3] = ""
    assert retype(placeholder) == 1 and list(placeholder.graph.node[0].input) == ["A", "B", "scales"]
    assert retype(model) == 1
    node = model.graph.node[0]
    assert (node.domain, node.op_type) == (kernels.DOMAIN, kernels.OP_TYPE)
    assert {a.name for a in node.attribute} == {"K", "N", "bits", "block_size"}
    onnx.save(model, tmp_path / "m.onnx")
    out = session(onnx.load(tmp_path / "m.onnx"), KERNEL.library).run(None, {"A": np.ones((1, 2, 64), np.float32)})
    assert out[0].shape == (1, 2, 32)


@pytest.fixture(scope="module")
def int4_export(tiny_model_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from plugin.convert import export

    home = tmp_path_factory.mktemp("home-rows")
    return export(str(tiny_model_factory("llama")), target="cpu", precision="int4", home=home).path


def greedy(n: int, prompt: str) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))


@needs_kernel
def test_batched_int4_greedy_on_the_rows_kernel_equals_one_at_a_time(int4_export: Path) -> None:
    from test_ort_batching import PROMPTS, run_together, tokens

    backend = OrtGenaiBackend(int4_export, device="cpu")
    backend.load()
    try:
        assert backend._runner is not None, backend.batching_reason
        assert backend.kernels.startswith("rows kernel"), backend.kernels
        assert backend.kernels in backend.health().detail  # operators see which kernels serve
        requests = [greedy(12 + 3 * i, p) for i, p in enumerate(PROMPTS)]
        alone = [tokens(backend.generate(r)) for r in requests]  # one at a time, the same session
        together = [tokens(s) for s in run_together(backend, requests)]
        assert together == alone
        assert [len(t) for t in alone] == [r.sampling.max_new_tokens for r in requests]
    finally:
        backend.unload()


def test_without_the_kernel_the_backend_keeps_onnxruntimes_and_says_why(int4_export: Path, monkeypatch) -> None:
    monkeypatch.setenv(kernels.SWITCH_ENV, "0")
    kernels.rows_kernel.cache_clear()
    try:
        backend = OrtGenaiBackend(int4_export, device="cpu")
        backend.load()
        try:
            assert backend._runner is not None
            assert backend.kernels == f"{kernels.SWITCH_ENV}=0: onnxruntime's MatMulNBits"
            assert len(list(backend.generate(greedy(4, "Hi")))) >= 1
        finally:
            backend.unload()
    finally:
        kernels.rows_kernel.cache_clear()


def test_kernel_refusals_name_the_cause(monkeypatch, tmp_path: Path) -> None:
    assert kernels.missing_cpu_features(frozenset({"avx2", "avx512f"})) == ["avx512bw", "avx512vl", "avx512_vnni"]
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    kernels.rows_kernel.cache_clear()
    try:
        assert kernels.rows_kernel().library is None
        assert "lacks avx512f, avx512bw, avx512vl, avx512_vnni" in kernels.rows_kernel().reason
        monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset(kernels.REQUIRED_FLAGS))
        monkeypatch.setenv("CXX", "no-such-compiler")
        kernels.rows_kernel.cache_clear()
        assert "no C++ compiler" in kernels.rows_kernel().reason
        broken = tmp_path / "cxx"
        broken.write_text("#!/bin/sh\necho 'cc1plus: fatal error: out of disk' >&2\nexit 1\n")
        broken.chmod(0o755)
        monkeypatch.setenv("CXX", str(broken))
        monkeypatch.setenv(kernels.DIR_ENV, str(tmp_path / "kernels"))
        kernels.rows_kernel.cache_clear()
        kernel = kernels.rows_kernel()
        assert kernel.library is None and "rows kernel build failed" in kernel.reason
        assert "cc1plus: fatal error: out of disk" in kernel.reason  # the compiler's own words
        assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built is left to load
    finally:
        kernels.rows_kernel.cache_clear()


@needs_kernel
def test_bench_rows_kernel_quick_run_on_a_tiny_export(int4_export: Path, tmp_path: Path) -> None:
    import json

    from benchmarks.bench_rows_kernel import main

    out = tmp_path / "rows_kernel.json"
    assert main(["--model", str(int4_export), "--rows", "1", "8", "--runs", "25", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["shapes"] and result["agreement"] is None  # an export folder has no torch source to agree with
    assert {r["rows"] for r in result["ops"]} == {1, 8}
    assert all(r["onnxruntime_us"] > 0 and r["rows_us"] > 0 for r in result["ops"])
    assert set(result["per_step"]) == {"1", "8"}
