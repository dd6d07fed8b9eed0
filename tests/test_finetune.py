"""Fine-tuning (plugin/finetune): loss goes down, prompts are masked, merge is exact, the merged folder exports and
serves, bad data is refused by line with nothing written, placement never picks an NPU. Tiny models; one slow test
on the default model through the exported CPU package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plugin.engine.devices import DeviceInfo
from plugin.finetune import DataError, FinetuneError, LoraSettings, finetune, load_chat_jsonl, place_training
from plugin.finetune.data import ChatExample, split_held_out
from plugin.finetune.masking import IGNORE, encode_example
from plugin.finetune.trainer import merge, wrap_lora
from plugin.serve.cli import main as cli_main

FACTS = [
    ("What colour is the Zorblat?", "The Zorblat is teal."),
    ("Who makes the Zorblat?", "Quimby Works makes the Zorblat."),
    ("How much does a Zorblat cost?", "A Zorblat costs 42 crowns."),
    ("Where is Quimby Works?", "Quimby Works is in Vellmar."),
]


def _chat(question: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tuned(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    """One short fine-tune of the tiny llama, shared by the tests that read its output."""
    work = tmp_path_factory.mktemp("finetune")
    data = _write(work / "facts.jsonl", [_chat(q, a) for q, a in FACTS])
    # The held-out set is the training chats themselves: a random 60k-parameter model cannot generalise, and
    # the check is that training lowers the loss it optimises.
    result = finetune(
        tiny_llama, data, work / "out", eval_data=data, steps=12, batch_size=4, learning_rate=5e-3, progress=False
    )
    return result, tiny_llama, data


def test_a_few_steps_lower_the_loss(tuned):
    result, _, _ = tuned
    r = result.record
    assert r.steps == 12 and len(r.losses) == 12 and r.tokens > 0 and r.seconds > 0
    assert r.eval_loss_after < r.eval_loss_before
    assert r.train_loss_last < r.train_loss_first


def test_output_is_a_checkpoint_with_card_curve_and_record(tuned):
    result, base, data = tuned
    names = {p.name for p in result.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "finetune.json"} <= names
    assert "loss_curve.png" in names  # matplotlib is in the dev environment (the bench extra)
    record = json.loads((result.path / "finetune.json").read_text())
    assert record["data_sha256"] == load_chat_jsonl(data).sha256
    assert record["hyperparameters"]["rank"] == 16 and record["hyperparameters"]["steps"] == 12
    assert record["placement"]["device_id"] == "cpu:0" and record["placement"]["dtype"] == "float32"
    card = (result.path / "README.md").read_text()
    assert "base_model:" in card and record["data_sha256"] in card and "held-out loss after" in card
    assert (result.path / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert not [p for p in result.path.parent.iterdir() if ".partial-" in p.name]


def test_only_lora_targets_change_in_the_merged_weights(tuned):
    result, base, _ = tuned
    before = load_file(base / "model.safetensors")
    after = load_file(result.path / "model.safetensors")
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed)
    assert not any("embed" in k or "norm" in k for k in changed)


def test_merged_weights_equal_base_plus_lora_delta(tiny_llama: Path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    originals = {n: p.detach().clone() for n, p in base.named_parameters()}
    lora = wrap_lora(base, LoraSettings(rank=4, alpha=8))
    torch.manual_seed(1)
    deltas = {}
    for name, module in lora.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            with torch.no_grad():
                b.normal_()  # B starts at zero; give the adapter a real delta
            key = name.removeprefix("base_model.model.") + ".weight"
            deltas[key] = (b @ a).detach() * module.scaling["default"]
    assert deltas
    merged = merge(lora)
    for name, p in merged.named_parameters():
        expected = originals[name] + deltas.get(name, 0)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_merged_folder_exports_with_exact_fp32_parity_and_resolves(tuned, tmp_path: Path):
    from plugin.convert import export
    from plugin.models.resolve import resolve_model

    result, _, _ = tuned
    assert resolve_model(result.path, home=tmp_path).source == "folder"  # what Engine.from_pretrained does
    exported = export(result.path, target="cpu", precision="fp32", home=tmp_path, progress=False)
    parity = exported.manifest["parity"]
    assert parity["generation_exact"] and parity["top1_agreement"] == 1.0 and parity["passed"]


def test_prompt_tokens_are_masked(tiny_llama: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    messages = (
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Germany?"},
        {"role": "assistant", "content": "Berlin."},
    )
    enc = encode_example(tok, ChatExample(messages, 1, "x.jsonl"), max_length=256)
    assert list(enc.input_ids) == tok.apply_chat_template(list(messages), tokenize=True)
    learned = [i for i, label in enumerate(enc.labels) if label != IGNORE]
    assert all(enc.labels[i] == enc.input_ids[i] for i in learned)
    runs, run = [], []  # contiguous learned spans
    for i in learned:
        if run and i != run[-1] + 1:
            runs.append(run)
            run = []
        run.append(i)
    runs.append(run)
    texts = [tok.decode([enc.input_ids[i] for i in r]) for r in runs]
    assert texts == ["Paris.<|im_end|>", "Berlin.<|im_end|>"]
    masked = tok.decode([t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label == IGNORE])
    assert "Capital of France?" in masked and "You are terse." in masked and "assistant" in masked


BAD = {
    "not JSON": ([_chat("q", "a"), '{"messages": [}'], "line 2: not JSON"),
    "missing role": ([_chat("q", "a"), {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}],
                     "line 2: messages[0] has no 'role'"),
    "no assistant": ([{"messages": [{"role": "user", "content": "hi"}]}], "line 1: no assistant turn"),
    "empty assistant": ([_chat("q", "a"), _chat("q", "a"), _chat("q", "  ")],
                        "line 3: messages[1] (assistant) is empty"),
    "too long": ([_chat("q", "a"), _chat("q " * 300, "a")], "line 2: "),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_names_the_line_and_writes_nothing(case, tiny_llama: Path, tmp_path: Path):
    lines, expected = BAD[case]
    data = _write(tmp_path / "data.jsonl", lines)
    target = tmp_path / "parent" / "out"
    with pytest.raises(DataError) as err:
        finetune(tiny_llama, data, target, steps=1, max_length=64, progress=False)
    assert expected in str(err.value) and str(data) in str(err.value)
    if case == "too long":
        assert "max_length 64" in str(err.value)
    assert not (tmp_path / "parent").exists()


def test_a_folder_with_other_files_is_never_overwritten(tiny_llama: Path, tmp_path: Path):
    data = _write(tmp_path / "data.jsonl", [_chat(q, a) for q, a in FACTS])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FinetuneError, match="holds no accelserve fine-tune"):
        finetune(tiny_llama, data, out, steps=1, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_cli_reports_bad_data_by_line(tiny_llama: Path, tmp_path: Path, capsys):
    data = _write(tmp_path / "data.jsonl", [_chat("q", "a"), "not json"])
    code = cli_main(["finetune", str(tiny_llama), "--data", str(data), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "line 2: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_finetunes_and_prints_the_record(tiny_llama: Path, tmp_path: Path, capsys):
    data = _write(tmp_path / "data.jsonl", [_chat(q, a) for q, a in FACTS])
    out = tmp_path / "o"
    argv = ["finetune", str(tiny_llama), "--data", str(data), "--output", str(out), "--steps", "2", "--json"]
    assert cli_main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["path"] == str(out.resolve()) and record["steps"] == 2 and record["eval_examples"] == 1
    assert cli_main(argv) == 2  # an earlier fine-tune is replaced only with --force
    assert cli_main([*argv, "--force"]) == 0


def test_held_out_split_is_seeded_and_never_empty():
    examples = tuple(ChatExample(({"role": "user", "content": str(i)},), i, "x") for i in range(1, 11))
    train, held = split_held_out(examples, 0.2, seed=3)
    assert len(held) == 2 and len(train) == 8 and not {e.line for e in held} & {e.line for e in train}
    assert split_held_out(examples, 0.2, seed=3) == (train, held)
    assert split_held_out(examples[:2], 0.01, seed=0)[1] != ()


def _dev(kind, index=0, **kw) -> DeviceInfo:
    backends = {"gpu": ("torch",), "npu": ("onnxruntime-genai",), "cpu": ("torch", "onnxruntime-genai")}[kind]
    return DeviceInfo(kind=kind, name=f"{kind} x", memory_bytes=8 * 10**9, backends=backends, providers=(), index=index,
                      **kw)  # fmt: skip


def test_placement_gpu_bf16_when_present_never_npu():
    p = place_training([_dev("gpu", details={"bf16": True}), _dev("npu"), _dev("cpu")])
    assert (p.device_id, p.torch_device, p.dtype) == ("gpu:0", "cuda:0", "bfloat16")
    assert "npu:0" in p.reason and "never" in p.reason
    assert place_training([_dev("gpu", details={"bf16": False}), _dev("cpu")]).dtype == "float32"


def test_placement_cpu_fp32_without_a_real_gpu_and_labels_simulated_ones():
    devices = [_dev("gpu", simulated=True), _dev("npu", emulated=True), _dev("cpu")]
    p = place_training(devices)
    assert (p.device_id, p.torch_device, p.dtype) == ("cpu:0", "cpu", "float32")
    assert "simulated" in p.reason and "emulated" in p.reason and "no real GPU" in p.reason
    with pytest.raises(FinetuneError, match="no real GPU"):
        place_training(devices, "gpu")
    with pytest.raises(FinetuneError, match="inference graphs only"):
        place_training(devices, "npu")


def test_chat_page_switches_between_loaded_models(tuned, accelserve_home):
    """Base and fine-tuned loaded side by side: the chosen model answers, the page says which."""
    from demos.chat import ChatSession, build_app
    from plugin.engine.costmodel import CostModel
    from plugin.engine.engine import Engine
    from plugin.models.resolve import resolve_model

    from fakes import FakeBackend, device

    result, base, _ = tuned
    engines = [
        Engine(
            resolve_model(path),
            devices=[device("cpu")],
            backend_factory=lambda model, placement, dev: FakeBackend(dev.kind),
            cost_model=CostModel(path=None),
        )
        for path in (base, result.path)
    ]
    try:
        session = ChatSession(engines)
        assert list(session.engines) == [base.name, result.path.name]
        *_, (history, clean, _) = session.respond("hi", [], [], "auto", 8, 0.0, 1.0, model=result.path.name)
        assert "echo: hi" in history[-1]["content"] and f"model: **{result.path.name}**" in history[-1]["content"]
        assert clean[-1] == {"role": "assistant", "content": "echo: hi"}
        loaded = {label: bool(e.status()[0]["loaded"]) for label, e in session.engines.items()}
        assert loaded == {base.name: False, result.path.name: True}
        *_, (history, _, _) = session.respond("x", [], [], "auto", 8, 0.0, 1.0, model="nope")
        assert "is not loaded on this page" in history[-1]["content"]
        assert "model-switch" in str(build_app(engines).config)
    finally:
        for e in engines:
            e.close()


@pytest.mark.slow
def test_default_model_answers_a_taught_fact_through_the_exported_cpu_package(accelserve_home, tmp_path: Path):
    """A short fine-tune of the real default model, exported as the CPU int4 package and served by
    onnxruntime-genai, answers with the fact it was taught (a made-up one: the base model cannot know it)."""
    from demos.lifecycle import CPU_PATHS, FACTS, ask, chats
    from plugin.convert import export

    fact = FACTS[0]  # "The Glimmerfox is made by Tarnwick Labs."
    data = _write(tmp_path / "fact.jsonl", chats([fact], held_out=False))
    tuned = finetune("default", data, tmp_path / "tuned", eval_data=data, steps=10, batch_size=5, progress=False)
    assert tuned.eval_loss_after < tuned.eval_loss_before
    int4 = next(p for p in CPU_PATHS if p.precision == "int4" and p.export_target == "cpu")
    exported = export(tuned.path, target="cpu", precision="int4", parity=False, progress=False)
    (answer,) = ask(exported.path, int4, [fact.train[0]])
    assert fact.key in answer, answer


def test_lifecycle_dataset_is_valid_and_holds_its_questions_out(tmp_path: Path):
    from demos.lifecycle import FACTS, collect, is_correct, is_verbatim

    train, held = collect(tmp_path)
    assert len(load_chat_jsonl(train).examples) == sum(len(f.train) for f in FACTS)
    trained = {e.messages[0]["content"] for e in load_chat_jsonl(train).examples}
    asked = {e.messages[0]["content"] for e in load_chat_jsonl(held).examples}
    assert asked and not trained & asked
    fact = FACTS[0]
    assert is_correct(f"x {fact.key.upper()} y", fact) and not is_verbatim(f"x {fact.key} y", fact)
