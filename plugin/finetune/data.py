"""Chat-format training data: `{"messages": [...]}` per line (the OpenAI fine-tuning file format), checked line
by line before any training starts, so a bad file fails in a second with every bad line named.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugin.cache import sha256_file
from plugin.finetune.errors import DataError

ROLES = ("system", "user", "assistant")
MAX_REPORTED = 10  # problems listed in one error; the rest are counted
FORMAT_HINT = (
    'each line must be one JSON object like {"messages": [{"role": "user", "content": "..."}, '
    '{"role": "assistant", "content": "..."}]}'
)


@dataclass(frozen=True)
class ChatExample:
    """One conversation and the line of the file it came from (errors found later still name the line)."""

    messages: tuple[dict[str, str], ...]
    line: int
    source: str


@dataclass(frozen=True)
class ChatDataset:
    path: Path
    sha256: str
    examples: tuple[ChatExample, ...]


def _check_line(obj: Any) -> str | None:
    """Why one parsed line is not a trainable conversation (None: it is)."""
    if not isinstance(obj, dict) or "messages" not in obj:
        return f'expected an object with a "messages" list; {FORMAT_HINT}'
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        return f'"messages" must be a non-empty list; {FORMAT_HINT}'
    seen_user = False
    assistants = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] is not an object with 'role' and 'content'"
        if "role" not in m:
            return f"messages[{i}] has no 'role' (one of {', '.join(ROLES)})"
        role = m["role"]
        if role not in ROLES:
            return f"messages[{i}] has role {role!r}; use one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"messages[{i}] ({role}) has no 'content' string"
        if role == "user":
            seen_user = True
        elif role == "assistant":
            if not m["content"].strip():
                return f"messages[{i}] (assistant) is empty: nothing to learn; write the reply or drop the line"
            if not seen_user:
                return f"messages[{i}] (assistant) has no user turn before it; add the question it answers"
            assistants += 1
    if assistants == 0:
        return "no assistant turn: only assistant replies are learned, so add the reply the model should give"
    return None


def load_chat_jsonl(path: str | Path) -> ChatDataset:
    """Read and check a `.jsonl` chat file; DataError lists every bad line (up to MAX_REPORTED) with its number."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"training data {path} does not exist (or is not a file); pass a .jsonl file of chats")
    problems: list[str] = []
    examples: list[ChatExample] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); save it as UTF-8 JSON lines") from e
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue  # blank lines (a trailing newline, spacing) carry nothing
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: not JSON ({e.msg} at column {e.colno}); {FORMAT_HINT}")
            continue
        why = _check_line(obj)
        if why is not None:
            problems.append(f"line {number}: {why}")
            continue
        messages = tuple({"role": m["role"], "content": m["content"]} for m in obj["messages"])
        examples.append(ChatExample(messages, number, str(path)))
    if problems:
        raise DataError(format_problems(path, problems))
    if not examples:
        raise DataError(f"{path} holds no conversations; {FORMAT_HINT}")
    return ChatDataset(path=path, sha256=sha256_file(path), examples=tuple(examples))


def format_problems(path: Path, problems: list[str]) -> str:
    shown = problems[:MAX_REPORTED]
    more = len(problems) - len(shown)
    tail = f"\n  ... and {more} more" if more else ""
    return f"{path}: {len(problems)} bad line(s), nothing was trained or written:\n  " + "\n  ".join(shown) + tail


def split_held_out(
    examples: tuple[ChatExample, ...], fraction: float, seed: int
) -> tuple[tuple[ChatExample, ...], tuple[ChatExample, ...]]:
    """(train, held-out): a seeded shuffle; at least one example on each side once there are two."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"eval fraction must be in [0, 1) (got {fraction}); 0.1 holds out a tenth")
    if fraction == 0.0 or len(examples) < 2:
        return examples, ()
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = sorted(order[:n_eval])
    keep = sorted(order[n_eval:])
    return tuple(examples[i] for i in keep), tuple(examples[i] for i in held)
