"""The built-in calibration set and the transformer-graph feeds it produces.

Static quantization fixes every activation's range ahead of time, so the prompts it sees decide the
accuracy: they cover chat turns, code, numbers and several languages (scripts with long byte-level
tokens included), each as a user question with an assistant answer in the model's chat template.
The set is versioned: changing a prompt changes `CALIBRATION_VERSION` and its hash, both part of the
export cache key and the manifest. Parity (parity.py) is measured on different text.

Feeds come from the fp32 graphs themselves (runner.py), window by window for the context graph and
token by token (teacher-forced through the answer) for the iterator, produced lazily: one feed holds
every layer's KV buffer, so a list of them would not fit in memory for a real model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from plugin.convert.qnn.runner import PipelineRunner

CALIBRATION_VERSION = 1
# (user, assistant) pairs; keep them short: the emulated HTP is slow and the set is run on every export.
CALIBRATION_SET: tuple[tuple[str, str], ...] = (
    ("Hi! How are you today?", "I'm doing well, thank you for asking. How can I help you?"),
    ("What is the tallest mountain in the world?", "Mount Everest, at 8,849 metres above sea level."),
    (
        "Give me three tips for sleeping better.",
        "1. Keep a regular schedule. 2. Avoid screens late. 3. Keep the room cool.",
    ),
    (
        "Summarize the plot of Romeo and Juliet in one sentence.",
        "Two young lovers from feuding families marry in secret and die tragically.",
    ),
    (
        "Write a haiku about autumn.",
        "Crimson leaves drifting,\nquiet paths beneath bare trees,\nthe year exhales slow.",
    ),
    (
        "Explain photosynthesis simply.",
        "Plants use sunlight, water and carbon dioxide to make sugar and release oxygen.",
    ),
    ("What is 17 times 23?", "17 x 23 = 391."),
    ("Convert 100 degrees Fahrenheit to Celsius.", "(100 - 32) * 5/9 = 37.8 degrees Celsius."),
    (
        "Write a Python function that reverses a string.",
        "def reverse(s: str) -> str:\n    return s[::-1]\n\nprint(reverse('hello'))  # olleh",
    ),
    (
        "How do I read a JSON file in JavaScript?",
        "const data = JSON.parse(fs.readFileSync('data.json', 'utf8'));\nconsole.log(data.name);",
    ),
    ("What does this SQL do? SELECT COUNT(*) FROM users WHERE age > 30;", "It counts the users older than 30."),
    (
        "Fix this bug: for i in range(10) print(i)",
        "A colon is missing:\n\nfor i in range(10):\n    print(i)",
    ),
    ("Quelle est la capitale de l'Italie ?", "La capitale de l'Italie est Rome."),
    ("¿Cómo se dice 'good morning' en español?", "Se dice «buenos días»."),
    ("Was ist der längste Fluss Deutschlands?", "Der Rhein ist mit etwa 865 km in Deutschland der längste Fluss."),
    ("Qual é a cor do céu?", "Num dia limpo, o céu é azul."),
    ("日本の首都はどこですか？", "日本の首都は東京です。"),
    ("中国有多少个省？", "中国有23个省。"),
    ("Как дела?", "Спасибо, всё хорошо! Чем могу помочь?"),
    ("ما هي عاصمة مصر؟", "عاصمة مصر هي القاهرة."),
    ("Translate 'thank you' into Hindi.", "धन्यवाद (dhanyavaad)."),
    ("List the planets of the solar system.", "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."),
    ("Tell me a short joke.", "Why did the scarecrow win an award? Because he was outstanding in his field!"),
    ("What year did the Second World War end?", "It ended in 1945."),
)
DECODE_STEPS = 16  # iterator feeds per prompt (teacher-forced answer tokens)


def calibration_record() -> dict[str, Any]:
    """Version, size and hash of the set (manifest `calibration`, cache key)."""
    payload = json.dumps(CALIBRATION_SET, ensure_ascii=False).encode()
    return {
        "version": CALIBRATION_VERSION,
        "prompts": len(CALIBRATION_SET),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "decode_steps_per_prompt": DECODE_STEPS,
    }


def tokenize_set(source: Path, context_length: int) -> list[tuple[list[int], int]]:
    """(token ids of question + answer, length of the question part) per pair, in the chat template if any."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    out = []
    for user, assistant in CALIBRATION_SET:
        if tok.chat_template:
            question = tok.apply_chat_template(
                [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
            )
            full = question + assistant + (tok.eos_token or "")
        else:
            question, full = f"{user}\n", f"{user}\n{assistant}"
        q_ids = tok(question, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"][:context_length]
        out.append((ids, min(len(q_ids), len(ids) - 1)))
    return out


def context_feeds(runner: PipelineRunner, samples: list[tuple[list[int], int]]) -> Iterator[dict[str, np.ndarray]]:
    """Every context-graph feed of every sample, produced while the fp32 graphs run."""
    for ids, _ in samples:
        for _, feeds in runner.prefill_steps(ids):
            yield feeds


def iterator_feeds(runner: PipelineRunner, samples: list[tuple[list[int], int]]) -> Iterator[dict[str, np.ndarray]]:
    """Iterator feeds: prefill the question, then feed the answer one token at a time (teacher forcing)."""
    for ids, split in samples:
        runner.prefill(ids[:split])
        for token in ids[split : split + DECODE_STEPS]:
            if runner.length >= runner.shape.context_length:
                break
            for _, feeds in runner.decode_steps(token):
                yield feeds
