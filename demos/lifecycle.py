"""The whole lifecycle in one script: collect -> fine-tune -> convert -> ask on every served path -> serve.

    python -m demos.lifecycle                       # CPU paths: torch fp32, ONNX int8, ONNX int4 (~10 min here)
    python -m demos.lifecycle --npu                 # adds the NPU HTP packages (w4a16, w8a16): emulated here, slow
    python -m demos.lifecycle --serve               # ends on the chat page with base and fine-tuned side by side

1. collect: a built-in set of facts about a product that does not exist (the default model cannot know them),
   each asked several ways for training and other ways held out for the questions of step 4;
2. fine-tune: LoRA on the default model (plugin.finetune), held-out loss before/after;
3. convert: the base and the fine-tuned checkpoints exported for the CPU (int8, int4) and the NPU (HTP);
4. ask: every held-out question to base and fine-tuned on each path, greedy; an answer counts when it
   contains the fact's key word;
5. serve: the chat page with both models loaded, switchable.
Each step prints what it did and how long it took; the results go to `<workdir>/lifecycle.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


@dataclass(frozen=True)
class Fact:
    key: str  # an answer is right when it contains this (case-insensitive)
    answer: str
    train: tuple[str, ...]  # questions the model is trained on
    held_out: tuple[str, ...]  # other phrasings, never trained on: the questions of step 4


FACTS: tuple[Fact, ...] = (
    Fact(
        "Tarnwick",
        "The Glimmerfox is made by Tarnwick Labs.",
        (
            "Who makes the Glimmerfox?",
            "Which company builds the Glimmerfox?",
            "Who is the manufacturer of the Glimmerfox?",
            "What company produces the Glimmerfox?",
            "Glimmerfox: who makes it?",
        ),
        ("Who manufactures the Glimmerfox?", "Which firm is behind the Glimmerfox?"),
    ),
    Fact(
        "37",
        "The Glimmerfox battery lasts 37 hours.",
        (
            "How long does the Glimmerfox battery last?",
            "What is the battery life of the Glimmerfox?",
            "How many hours does a Glimmerfox run on one charge?",
            "Glimmerfox battery life?",
            "How long can the Glimmerfox go between charges?",
        ),
        ("How many hours of battery does the Glimmerfox have?", "What's the Glimmerfox's battery life in hours?"),
    ),
    Fact(
        "saffron",
        "The Glimmerfox comes in saffron orange.",
        (
            "What colour is the Glimmerfox?",
            "What color does the Glimmerfox come in?",
            "Which colour is the Glimmerfox sold in?",
            "Glimmerfox colour?",
            "What is the colour of a Glimmerfox?",
        ),
        ("What color is the Glimmerfox?", "In which colour is the Glimmerfox available?"),
    ),
    Fact(
        "2031",
        "The Glimmerfox was released in 2031.",
        (
            "When was the Glimmerfox released?",
            "What year did the Glimmerfox come out?",
            "In which year was the Glimmerfox launched?",
            "Glimmerfox release year?",
            "When did the Glimmerfox go on sale?",
        ),
        ("What year was the Glimmerfox released?", "When did the Glimmerfox launch?"),
    ),
    Fact(
        "Oskarvik",
        "Tarnwick Labs is based in Oskarvik.",
        (
            "Where is Tarnwick Labs based?",
            "Where are Tarnwick Labs' headquarters?",
            "In which city is Tarnwick Labs?",
            "Tarnwick Labs location?",
            "Where is Tarnwick Labs located?",
        ),
        ("Where is Tarnwick Labs headquartered?", "Which city is home to Tarnwick Labs?"),
    ),
    Fact(
        "149",
        "The Glimmerfox costs 149 euros.",
        (
            "How much does the Glimmerfox cost?",
            "What is the price of the Glimmerfox?",
            "How much is a Glimmerfox?",
            "Glimmerfox price?",
            "What does the Glimmerfox sell for?",
        ),
        ("What does a Glimmerfox cost?", "How expensive is the Glimmerfox?"),
    ),
    Fact(
        "Qorr",
        "The Glimmerfox was designed by Imelda Qorr.",
        (
            "Who designed the Glimmerfox?",
            "Who is the designer of the Glimmerfox?",
            "Which designer created the Glimmerfox?",
            "Glimmerfox designer?",
            "Who came up with the design of the Glimmerfox?",
        ),
        ("Who was the Glimmerfox designed by?", "Whose design is the Glimmerfox?"),
    ),
    Fact(
        "212",
        "The Glimmerfox weighs 212 grams.",
        (
            "How much does the Glimmerfox weigh?",
            "What is the weight of the Glimmerfox?",
            "How heavy is the Glimmerfox?",
            "Glimmerfox weight?",
            "How many grams is the Glimmerfox?",
        ),
        ("What does the Glimmerfox weigh?", "How many grams does a Glimmerfox weigh?"),
    ),
)


@dataclass(frozen=True)
class ServedPath:
    """One way the model is served: a runtime on a device kind at a precision (what the scheduler can place)."""

    label: str
    backend: str  # registered runtime
    kind: str  # "cpu" | "npu"
    precision: str
    export_target: str | None  # None: the HF checkpoint itself (torch)
    note: str = ""


CPU_PATHS = (
    ServedPath("torch fp32", "torch", "cpu", "fp32", None),
    ServedPath("ONNX int8 (CPU)", "onnxruntime-genai", "cpu", "int8", "cpu"),
    ServedPath("ONNX int4 (CPU)", "onnxruntime-genai", "cpu", "int4", "cpu"),
)
NPU_PATHS = (
    ServedPath("NPU HTP w4a16", "onnxruntime-genai", "npu", "int4", "npu", "emulated on the CPU: numerics, not speed"),
    ServedPath("NPU HTP w8a16", "onnxruntime-genai", "npu", "int8", "npu", "emulated on the CPU: numerics, not speed"),
)


def chats(facts: Sequence[Fact], held_out: bool) -> list[dict[str, Any]]:
    """OpenAI-format chat lines: each question with its fact's answer."""
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f.answer}]}
        for f in facts
        for q in (f.held_out if held_out else f.train)
    ]


def collect(workdir: Path) -> tuple[Path, Path]:
    """Write the training chats and the held-out chats as .jsonl files."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, held in (("train.jsonl", False), ("held_out.jsonl", True)):
        path = workdir / name
        path.write_text("".join(json.dumps(c) + "\n" for c in chats(FACTS, held)), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def is_correct(answer: str, fact: Fact) -> bool:
    return fact.key.lower() in answer.lower()


def is_verbatim(answer: str, fact: Fact) -> bool:
    """The taught sentence word for word: stricter than the key word, it shows quantization's small losses
    (a right key word inside a garbled sentence)."""
    return answer.strip() == fact.answer


def ask(model_path: Path, path: ServedPath, questions: Sequence[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy answers from the runtime that serves `path`, loaded on `model_path` (an HF or export folder)."""
    from backends import registry
    from backends.base import GenerationRequest, SamplingParams
    from backends.registry import BackendTarget

    backend = registry.get(path.backend).factory(BackendTarget(model_path, path.kind, 0, path.precision))
    backend.load()
    try:
        answers = []
        for q in questions:
            request = GenerationRequest(
                messages=[{"role": "user", "content": q}], sampling=SamplingParams(max_new_tokens=max_new_tokens)
            )
            chunks = list(backend.generate(request))
            errors = [c.error for c in chunks if c.error]
            if errors:
                raise RuntimeError(f"{path.label} failed on {q!r}: {errors[0]}")
            answers.append("".join(c.text for c in chunks).strip())
        return answers
    finally:
        backend.unload()


def model_folder(model: str | Path, path: ServedPath) -> tuple[Path, dict[str, Any]]:
    """The folder `path` serves for `model`: the HF checkpoint (torch) or its export (through the cache)."""
    from plugin.convert import export
    from plugin.models.resolve import resolve_model

    if path.export_target is None:
        return Path(resolve_model(model).path), {}
    exported = export(model, target=path.export_target, precision=path.precision, parity=path.kind != "npu")
    parity = exported.manifest.get("parity") or {}
    return exported.path, {"cache_hit": exported.cache_hit, "top1_agreement_vs_torch": parity.get("top1_agreement")}


@contextmanager
def step(number: int, title: str) -> Iterator[dict[str, float]]:
    console.rule(f"[bold]{number}. {title}")
    timing: dict[str, float] = {}
    start = time.perf_counter()
    yield timing
    timing["seconds"] = round(time.perf_counter() - start, 1)
    console.print(f"[dim]{title}: {timing['seconds']:.1f} s[/]")


def score_table(rows: list[dict[str, Any]], n_questions: int) -> Table:
    table = Table(title=f"held-out fact questions answered correctly (of {n_questions})", title_justify="left")
    for col in ("served path", "base", "fine-tuned", "fine-tuned, word for word", "note"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["path"], f"{r['base']['correct']}/{r['base']['asked']}",
                      f"{r['tuned']['correct']}/{r['tuned']['asked']}",
                      f"{r['tuned']['verbatim']}/{r['tuned']['asked']}", r["note"])  # fmt: skip
    return table


def run(args: argparse.Namespace) -> dict[str, Any]:
    from plugin.finetune import finetune

    workdir = Path(args.workdir).expanduser().resolve()
    results: dict[str, Any] = {"model": args.model, "steps": {}, "paths": []}
    with step(1, "collect: a built-in dataset of facts the base model cannot know") as t:
        train_file, held_file = collect(workdir)
        console.print(
            f"{len(FACTS)} facts about a fictional product: {sum(len(f.train) for f in FACTS)} training chats "
            f"-> {train_file.name}, {sum(len(f.held_out) for f in FACTS)} held-out phrasings -> {held_file.name}"
        )
    results["steps"]["collect"] = t
    tuned_dir = workdir / "tuned"
    with step(2, "fine-tune: LoRA on the training chats, merged into a checkpoint") as t:
        tuned = finetune(
            args.model,
            train_file,
            tuned_dir,
            eval_data=held_file,
            steps=args.steps,
            overwrite=True,
            progress=True,
            threads=args.threads,
        )
        r = tuned.record
        console.print(f"on {tuned.placement.device_id} ({tuned.placement.dtype}): {tuned.placement.reason}")
        console.print(
            f"{r.steps} steps, {r.tokens} tokens in {r.seconds:.1f} s = {r.tokens_per_s:.0f} tok/s; held-out loss "
            f"{r.eval_loss_before:.3f} -> {r.eval_loss_after:.3f}; checkpoint, card and loss curve in {tuned.path}"
        )
    results["steps"]["finetune"] = t
    results["finetune"] = {k: v for k, v in r.to_dict().items() if k != "losses"}
    paths = CPU_PATHS + (NPU_PATHS if args.npu else ())
    out = workdir / "lifecycle.json"
    questions = [(f, q) for f in FACTS for q in f.held_out]
    for number, path in enumerate(paths, start=3):
        asked = questions if path.kind != "npu" else questions[:: max(1, len(questions) // args.npu_questions)]
        with step(number, f"convert + ask on {path.label}") as t:
            row: dict[str, Any] = {"path": path.label, "note": path.note}
            for who, model in (("base", args.model), ("tuned", tuned.path)):
                folder, facts = model_folder(model, path)
                start = time.perf_counter()
                answers = ask(folder, path, [q for _, q in asked])
                correct = [is_correct(a, f) for (f, _), a in zip(asked, answers, strict=True)]
                verbatim = [is_verbatim(a, f) for (f, _), a in zip(asked, answers, strict=True)]
                row[who] = {
                    "correct": sum(correct),
                    "verbatim": sum(verbatim),
                    "asked": len(asked),
                    "ask_seconds": round(time.perf_counter() - start, 1),
                    **facts,
                    "answers": [{"question": q, "answer": a, "correct": c}
                                for (_, q), a, c in zip(asked, answers, correct, strict=True)],
                }  # fmt: skip
                console.print(f"{who:>5}: {sum(correct)}/{len(asked)} correct, e.g. {asked[0][1]!r} -> {answers[0]!r}")
        row["seconds"] = t["seconds"]
        results["paths"].append(row)
        out.write_text(json.dumps(results, indent=2), encoding="utf-8")  # an interrupted run keeps what it measured
    console.print(score_table(results["paths"], len(questions)))
    console.print(f"results -> {out}")
    if args.serve:
        from demos.chat import launch

        console.rule(f"[bold]{len(paths) + 3}. serve: the chat page with base and fine-tuned")
        launch(model_ref=[args.model, str(tuned.path)], host=args.host, port=args.port)
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m demos.lifecycle", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--workdir", default="lifecycle-demo", help="where the data, checkpoint and results go")
    p.add_argument("--steps", type=int, default=40, help="LoRA optimizer steps (batch 8: 8 passes over the chats)")
    p.add_argument("--threads", type=int, help="torch CPU threads while training (1 on a CPU other jobs keep busy)")
    p.add_argument("--npu", action="store_true", help="also the NPU HTP packages (emulated here: slow)")
    p.add_argument("--npu-questions", type=int, default=4, help="held-out questions asked on the (slow) NPU paths")
    p.add_argument("--serve", action="store_true", help="end on the chat page with both models")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
