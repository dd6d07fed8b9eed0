"""Parity of an HTP package measured on the HTP itself (emulated on x86-64), written into the manifest.

Calibration decides accuracy, and the CPU run of a QDQ graph is not the HTP run of it (HTP computes
GroupQueryAttention and the norms in fp16, and rounds its own way), so three comparisons are made on
the same token sequences (prompt + torch's greedy continuation, text the calibration never saw):
- HTP vs torch fp32 under teacher forcing: top-1 agreement and logit cosine at every position;
- HTP vs the CPU provider on the same QDQ graphs: top-1 agreement and cosine (what the emulator adds);
- CPU QDQ vs torch top-1, for reference.
Teacher forcing runs the compiled context graph window by window (runner.py), the way genai prefills,
so every position's logits come out of one window run. A greedy answer through onnxruntime-genai on
HTP (both graphs, the config as shipped) is recorded as well.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "Numbers: 1 2 3 4",
)
CHAT_QUESTION = "What is the capital of France?"
NEW_TOKENS = 16
ANSWER_TOKENS = 12
TARGETS = {"int8": 0.90, "int4": 0.70}  # teacher-forced top-1 vs torch, on the default model


@dataclass
class QnnParity:
    precision: str
    device: str  # "htp-emulated" | "htp"
    sequences: int
    positions: int
    top1_vs_torch: float
    cosine_vs_torch: float
    min_cosine_vs_torch: float
    top1_htp_vs_cpu: float
    cosine_htp_vs_cpu: float
    top1_cpu_vs_torch: float
    answer: str | None = None
    answer_question: str = CHAT_QUESTION
    target_top1: float | None = None
    passed: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(-1)
    return num / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def torch_sequences(source: Path, context_length: int) -> tuple[list[list[int]], list[np.ndarray]]:
    """Prompt + torch greedy continuation, and torch's logits at every position."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    seqs, logits = [], []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=model.generation_config.pad_token_id or model.generation_config.eos_token_id,
            )
            seq = out[0].tolist()[:context_length]
            seqs.append(seq)
            logits.append(model(torch.tensor([seq])).logits[0].float().numpy())
    return seqs, logits


def genai_answer(folder: Path, question: str = CHAT_QUESTION, new_tokens: int = ANSWER_TOKENS) -> str:
    """Greedy chat answer through onnxruntime-genai with the folder's own config (QNN on HTP)."""
    import onnxruntime_genai as og

    from backends import qnn_ep
    from backends.ort_genai.backend import prompt_span

    qnn_ep.register()
    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    messages = json.dumps([{"role": "user", "content": question}])
    try:
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    except Exception:  # no chat template in the tokenizer
        prompt = question
    ids = tok.encode(prompt)
    window = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["sliding_window"]
    padded = prompt_span(len(ids), window["window_size"])
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=padded + new_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    answer = tok.decode(gen.get_sequence(0)[padded:])
    del gen, model
    return answer


def measure(
    folder: Path,
    source: Path,
    precision: str,
    runners: dict[str, Any],
    device: str,
    context_length: int,
    answer: bool = True,
) -> QnnParity:
    """Compare `runners["htp"]` and `runners["cpu"]` (PipelineRunner) with torch on the parity sequences."""
    seqs, ref = torch_sequences(source, context_length)
    htp_rows, cpu_rows, ref_rows = [], [], []
    for seq, r in zip(seqs, ref, strict=True):
        htp_rows.append(runners["htp"].prefill(seq))
        cpu_rows.append(runners["cpu"].prefill(seq))
        ref_rows.append(r)
    htp, cpu, tref = (np.concatenate(x) for x in (htp_rows, cpu_rows, ref_rows))
    cos_ref = _cosine(htp, tref)
    report = QnnParity(
        precision=precision,
        device=device,
        sequences=len(seqs),
        positions=int(tref.shape[0]),
        top1_vs_torch=round(float((htp.argmax(-1) == tref.argmax(-1)).mean()), 4),
        cosine_vs_torch=round(float(cos_ref.mean()), 5),
        min_cosine_vs_torch=round(float(cos_ref.min()), 5),
        top1_htp_vs_cpu=round(float((htp.argmax(-1) == cpu.argmax(-1)).mean()), 4),
        cosine_htp_vs_cpu=round(float(_cosine(htp, cpu).mean()), 6),
        top1_cpu_vs_torch=round(float((cpu.argmax(-1) == tref.argmax(-1)).mean()), 4),
        target_top1=TARGETS.get(precision),
    )
    report.passed = report.target_top1 is None or report.top1_vs_torch >= report.target_top1
    if not report.passed:
        log.warning(
            "%s on HTP: top-1 agreement with torch %.1f%% is below the %.0f%% target (cosine %.4f)",
            precision,
            100 * report.top1_vs_torch,
            100 * (report.target_top1 or 0),
            report.cosine_vs_torch,
        )
    if answer:
        report.answer = genai_answer(folder)
    return report
