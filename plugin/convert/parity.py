"""Parity of an export against the torch checkpoint it came from, recorded in manifest.json.

Two checks on fixed prompts, the same token ids fed to both sides (the tokenizer is checked separately):
- generation: greedy continuation by onnxruntime-genai (the runtime that will serve the folder) versus
  `transformers.generate(do_sample=False)`; fp32 must match token for token or the export fails, except
  where the two part at a tie (torch's logits of both tokens within `TIE_TOLERANCE`), which is noted.
- logits: prompt + torch's continuation fed to onnxruntime-genai one token at a time (teacher forcing), its
  logits after each token compared with torch's at that position: top-1 agreement and max |logit
  difference|. One token per step, because a fused graph computes lm_head for the last position only.
Quantized exports only warn when top-1 agreement falls below `AGREEMENT_WARN` for their precision: int4
round-to-nearest legitimately flips near-tied choices, and a warning with the figure beats a refusal.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from plugin.convert.errors import ExportError

log = logging.getLogger(__name__)

PROMPTS = (
    "The capital of France is",
    "Hello, how are you today?",
    "def main():\n    return",
    "Numbers: 1 2 3 4",
)
NEW_TOKENS = 8
# Teacher-forced top-1 agreement below which a quantized export logs a warning (fp32 must be exact).
AGREEMENT_WARN: dict[str, float] = {"fp32": 1.0, "fp16": 0.98, "int8": 0.95, "int4": 0.80}
TIE_TOLERANCE = 1e-4
"""Two tokens whose torch logits differ by less than this are a tie at fp32: a prefill computed in one pass
and one computed token by token round differently (~1e-6), so greedy may take either, and an exact runtime
can part from torch there. Seen on tiny random and freshly fine-tuned checkpoints (max logit diff ~1e-6)."""


@dataclass
class ParityReport:
    precision: str
    provider: str
    prompts: int
    new_tokens: int
    generation_match: list[bool] = field(default_factory=list)
    generation_exact: bool = False
    generation_ties: list[float] = field(default_factory=list)  # torch's logit gap where a continuation parted
    top1_agreement: float | None = None
    max_logit_diff: float | None = None
    tokenizer_match: bool | None = None
    threshold: float = 1.0
    passed: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _torch_side(source: Path, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[np.ndarray]]:
    """Greedy continuations and full-sequence logits from the torch checkpoint (fp32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.eval()
    sequences, logits = [], []
    with torch.no_grad():
        for ids in prompt_ids:
            inp = torch.tensor([ids])
            out = model.generate(
                inp,
                attention_mask=torch.ones_like(inp),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                num_beams=1,
                pad_token_id=model.generation_config.pad_token_id or model.generation_config.eos_token_id,
            )
            seq = out[0].tolist()
            sequences.append(seq)
            logits.append(model(torch.tensor([seq])).logits[0].float().numpy())
    return sequences, logits


def until_stop(seq: list[int], prompt_len: int, stop_ids: frozenset[int]) -> list[int]:
    """`seq` cut before the first stop token of its continuation: onnxruntime-genai leaves EOS out of a
    sequence, transformers keeps it, so the two are compared up to (not including) it."""
    for pos in range(prompt_len, len(seq)):
        if seq[pos] in stop_ids:
            return seq[:pos]
    return seq


def parting_gap(
    torch_seq: list[int], og_seq: list[int], torch_logits: np.ndarray, stop_ids: frozenset[int] = frozenset()
) -> float | None:
    """Where two greedy continuations of the same prompt first part, how far apart torch's logits put the two
    tokens (row i of `torch_logits` predicts token i + 1). Both are cut before their stop token
    (`until_stop`), so when one is a prefix of the other, the shorter one chose its likeliest stop id there.
    None when they do not part (identical, or the prompt itself differs)."""
    for pos, (a, b) in enumerate(zip(torch_seq, og_seq, strict=False)):
        if a != b:
            return None if pos == 0 else _gap(torch_logits[pos - 1], a, b)
    pos = min(len(torch_seq), len(og_seq))
    if len(torch_seq) == len(og_seq) or not stop_ids or pos == 0:
        return None
    row = torch_logits[pos - 1]
    token = (torch_seq if len(torch_seq) > pos else og_seq)[pos]
    stop = max(stop_ids, key=lambda t: float(row[t]))
    return _gap(row, token, stop)


def _gap(row: np.ndarray, a: int, b: int) -> float:
    return abs(float(row[a]) - float(row[b]))


def _og_logits(model: Any, seq: list[int]) -> np.ndarray:
    """Feed `seq` to onnxruntime-genai one token at a time; return the logits after each token [seq, vocab]."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(seq) + 1)
    gen = og.Generator(model, params)
    rows = []
    for token in seq:
        gen.append_tokens([token])
        rows.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1))
    return np.stack(rows)


def _og_generate(model: Any, ids: list[int], max_length: int) -> list[int]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max_length)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return list(gen.get_sequence(0))


def load_og_model_on_cpu(folder: Path) -> Any:
    """Load an export with onnxruntime-genai on the CPU provider, whatever its config names."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    return og.Model(config)


def run_parity(folder: Path, source: Path, precision: str) -> ParityReport:
    """Compare the export in `folder` with the torch checkpoint in `source` (see module docstring)."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    report = ParityReport(precision, "cpu", len(PROMPTS), NEW_TOKENS, threshold=AGREEMENT_WARN[precision])
    hf_tok = AutoTokenizer.from_pretrained(source)
    prompt_ids = [hf_tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]

    og_model = load_og_model_on_cpu(folder)
    og_tok = og.Tokenizer(og_model)
    report.tokenizer_match = all(list(og_tok.encode(p)) == ids for p, ids in zip(PROMPTS, prompt_ids, strict=True))
    if not report.tokenizer_match:
        raise ExportError(
            "onnxruntime-genai's tokenizer gives different ids than transformers on the parity prompts; the "
            "exported folder would mis-tokenize. Re-save the tokenizer as a fast tokenizer (tokenizer.json)."
        )

    stop_ids = frozenset(int(t) for t in og_tok.eos_token_ids)
    torch_seqs, torch_logits = _torch_side(source, prompt_ids)
    tied = 0
    for ids, full_seq, ref in zip(prompt_ids, torch_seqs, torch_logits, strict=True):
        seq = until_stop(full_seq, len(ids), stop_ids)
        og_seq = until_stop([int(t) for t in _og_generate(og_model, ids, len(ids) + NEW_TOKENS)], len(ids), stop_ids)
        report.generation_match.append(og_seq == seq)
        if og_seq != seq:
            log.info("generation differs: torch %s vs onnxruntime-genai %s", seq[len(ids) :], og_seq[len(ids) :])
            gap = parting_gap(seq, og_seq, ref, stop_ids)
            if gap is not None:
                report.generation_ties.append(gap)
                tied += int(gap <= TIE_TOLERANCE)
    report.generation_exact = all(report.generation_match)
    only_ties = sum(report.generation_match) + tied == len(report.generation_match)
    agree = total = 0
    max_diff = 0.0
    for seq, ref in zip(torch_seqs, torch_logits, strict=True):
        got = _og_logits(og_model, seq)
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += ref.shape[0]
        max_diff = max(max_diff, float(np.abs(got - ref).max()))
    del og_model
    report.top1_agreement = round(agree / total, 4)
    report.max_logit_diff = max_diff

    if precision == "fp32":
        report.passed = only_ties and report.top1_agreement == 1.0
        if report.passed and not report.generation_exact:
            report.notes.append(
                f"{tied} greedy continuation(s) parted from torch's at a tie (torch's logits of the two tokens "
                f"within {TIE_TOLERANCE:g}: {', '.join(f'{g:.1e}' for g in report.generation_ties)}); every "
                "teacher-forced top-1 choice equals torch's"
            )
            log.info("fp32 parity: %s", report.notes[-1])
    else:
        report.passed = report.top1_agreement >= report.threshold
        if not report.passed:
            log.warning(
                "%s export: top-1 agreement with torch %.1f%% is below the %.0f%% threshold (max logit diff %.3f)",
                precision,
                100 * report.top1_agreement,
                100 * report.threshold,
                max_diff,
            )
    return report
