"""Architecture coverage (plugin.convert.architectures): the table computed from the libraries, one tiny
checkpoint per served architecture enumerated from it (fp32 exact greedy parity, a sane int4 export), and
refusals before any work (reason, no traceback, nothing half-written in the cache)."""

from __future__ import annotations

import json

import pytest
from tiny_arch import build_tiny_checkpoint

from plugin.convert import ExportError, architectures, export, optimum_step, verify_export
from plugin.serve.cli import main as cli_main

TABLE = architectures.support_table()
SERVED = [row.model_type for row in TABLE if row.status != "refused"]
REFUSED = [row for row in TABLE if row.status == "refused"]
# One plain and one fused architecture beyond the original five run in the fast suite; all run when slow.
FAST = ("gpt_neox", "qwen3")


def _params(types: list[str]) -> list:
    return [pytest.param(t, marks=() if t in FAST else pytest.mark.slow) for t in types]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory):
    """model_type -> {precision: ExportedModel}, each export built once for the module (shared home)."""
    home = tmp_path_factory.mktemp("arch-home")
    built: dict[str, dict[str, object]] = {}

    def get(model_type: str, precision: str):
        entry = built.setdefault(model_type, {})
        if "source" not in entry:
            seed = architectures.support_for(model_type).measured.get("seed", 0)  # the checkpoint measured
            folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
            entry["source"] = build_tiny_checkpoint(folder, model_type, seed=seed)
        if precision not in entry:
            entry[precision] = export(
                entry["source"],
                target="cpu",
                precision=precision,
                home=home,
                progress=False,
                parity=precision == "fp32",
            )
        return entry[precision]

    return get


def test_table_has_one_row_per_optimum_text_generation_type():
    types = architectures.optimum_model_types()
    assert [row.model_type for row in TABLE] == list(types)
    assert {"llama", "qwen2", "mistral", "phi3", "gpt2"} <= set(SERVED)
    assert len(SERVED) > len(REFUSED)  # refusals are the exception


def test_fused_graph_is_chosen_by_the_builders_own_class_list():
    classes = architectures.builder_classes()
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM"} <= classes
    for row in TABLE:
        if row.status == "refused":
            assert row.graph == "-" and row.reason
            continue
        in_builder = row.hf_class in classes
        assert (row.graph == "fused") == (in_builder and not row.measured.get("fused_failure")), row
        assert "cpu" in row.targets and "fp32" in row.precisions
        assert "int4" in row.precisions or row.measured.get("int4_failure"), row


def test_npu_column_is_the_htp_pipelines_own_refusal():
    from plugin.convert.qnn.spec import qnn_unsupported_reason

    for row in TABLE:
        if row.status == "refused":
            continue
        assert ("npu" in row.targets) == (row.npu_reason is None), row
    llama = architectures.support_for("llama")
    assert "npu" in llama.targets
    assert qnn_unsupported_reason({"model_type": "opt"}, 1024) == architectures.support_for("opt").npu_reason


def test_an_architecture_only_remote_code_builds_is_refused_with_the_reason():
    if "internlm2" not in architectures.optimum_model_types():
        pytest.skip("this Optimum does not list internlm2")
    row = architectures.support_for("internlm2")
    assert row.status == "refused" and "trust_remote_code" in row.reason


def test_measured_record_applies_only_to_its_library_versions(tmp_path, monkeypatch):
    record = tmp_path / "measured.json"
    entry = {"opt": {"refusal": "measured: something the runtime cannot run"}}
    record.write_text(json.dumps({"versions": architectures.installed_versions(), "architectures": entry}))
    monkeypatch.setattr(architectures, "MEASURED_FILE", record)
    row = architectures.support_for("opt")
    assert row.status == "refused" and row.reason == entry["opt"]["refusal"]
    stale = {**architectures.installed_versions(), "onnxruntime-genai": "0.0.1"}
    record.write_text(json.dumps({"versions": stale, "architectures": entry}))
    assert architectures.support_for("opt").status == "unmeasured"


def test_committed_record_matches_the_installed_libraries():
    """Re-run benchmarks/arch_coverage.py after a library upgrade: until then rows read 'unmeasured'."""
    data = json.loads(architectures.MEASURED_FILE.read_text())
    assert data["versions"] == architectures.installed_versions()
    assert set(data["architectures"]) == set(architectures.optimum_model_types())


@pytest.mark.parametrize("model_type", _params(SERVED))
def test_fp32_export_reproduces_torch_and_int4_is_sane(model_type, exports):
    from plugin.convert.parity import load_og_model_on_cpu

    row = architectures.support_for(model_type)
    fp32 = exports(model_type, "fp32")
    m = fp32.manifest
    assert m["architecture"] == model_type
    assert m["graph"]["built"] == row.graph, m["graph"]
    assert m["parity"]["generation_exact"] is True and m["parity"]["top1_agreement"] == 1.0
    if "int4" not in row.precisions:  # measured: no int4 graph of this architecture reproduces it
        with pytest.raises(ExportError, match="not int4"):
            exports(model_type, "int4")
        return
    int4 = exports(model_type, "int4")  # parity figures for int4 are the benchmark's (arch_coverage.py)
    q = int4.manifest
    assert q["precision"] == "int4" and q["graph"]["built"] == row.graph
    assert q["quantization"]["bits"] == 4 and q["quantization"]["quantized_matmuls"] > 0
    assert verify_export(int4.path) == [] and int4.path != fp32.path
    tokens = _greedy_ids(load_og_model_on_cpu(int4.path), [5, 6, 7], 4)
    assert len(tokens) == 7 and all(0 <= t < q_vocab(int4.path) for t in tokens)


def q_vocab(folder) -> int:
    return json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]


def _greedy_ids(model, ids: list[int], new_tokens: int) -> list[int]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)]


def _refused_buildable() -> list:
    out = []
    for row in REFUSED:
        if row.hf_class is None:
            continue
        out.append(pytest.param(row.model_type, id=row.model_type))
    return out or [pytest.param("mixtral", id="mixtral")]


@pytest.mark.parametrize("model_type", _refused_buildable())
def test_refused_architecture_says_why_before_any_work(model_type, tmp_path, accelserve_home, monkeypatch, capsys):
    folder = build_tiny_checkpoint(tmp_path / model_type, model_type)

    def no_work(*args, **kwargs):
        raise AssertionError("no export work may start for a refused architecture")

    monkeypatch.setattr(optimum_step, "optimum_export", no_work)
    with pytest.raises(ExportError) as err:
        export(folder, target="cpu", precision="int4", home=accelserve_home, progress=False)
    row = architectures.support_for(model_type, json.loads((folder / "config.json").read_text()))
    assert f"{model_type!r}" in str(err.value) and row.reason in str(err.value)
    code = cli_main(["export", str(folder), "--target", "cpu"])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err + captured.out
    assert "cannot be exported" in " ".join(captured.err.split())
    exports_dir = accelserve_home / "exports"
    assert not exports_dir.exists() or not [p for p in exports_dir.iterdir() if not p.name.startswith(".")]


def test_cli_prints_the_supported_table(capsys):
    assert cli_main(["models", "--supported", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model_type"] for r in rows] == [row.model_type for row in TABLE]
    assert all({"graph", "precisions", "targets", "status", "reason"} <= set(r) for r in rows)
    assert cli_main(["models", "--supported"]) == 0
    assert "llama" in capsys.readouterr().out


def test_plain_genai_config_reads_sizes_through_the_config_class():
    from plugin.convert.genai_config import GraphIO, build_genai_config

    io = GraphIO(
        inputs=("input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value"),
        outputs=("logits", "present.0.key", "present.0.value"),
        num_layers=1,
        kv_heads=1,  # multi-query attention: the graph, not the config, says so
        head_dim=16,
        float_type="float32",
    )
    hf = {
        "model_type": "gpt_bigcode",
        "n_embd": 64,
        "n_head": 4,
        "n_positions": 128,
        "vocab_size": 400,
        "eos_token_id": 2,
    }
    decoder = build_genai_config(hf, None, io, "model.onnx", [])["model"]["decoder"]
    assert decoder["hidden_size"] == 64 and decoder["num_attention_heads"] == 4
    assert decoder["num_key_value_heads"] == 1 and decoder["head_size"] == 16
    assert "position_ids" not in decoder["inputs"]


def test_tiny_checkpoints_are_built_from_the_library_config_class(tmp_path):
    cfg = json.loads((build_tiny_checkpoint(tmp_path / "t", "gpt_neo") / "config.json").read_text())
    assert cfg["num_layers"] == 2 and cfg["hidden_size"] == 64 and len(cfg["attention_layers"]) == 2
