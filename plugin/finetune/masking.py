"""Tokenize a conversation with the model's own chat template, learning only the assistant turns.

The template is rendered for growing prefixes of the conversation: the text an assistant turn adds after
its generation prompt is learned (labels = ids), everything else (system prompt, user turns, role headers)
is masked (labels = -100), so the loss never teaches the model to write the user's side. The whitespace a
template puts after an end-of-turn token is masked too: generation stops at that token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugin.finetune.data import ChatExample, format_problems
from plugin.finetune.errors import DataError, FinetuneError

IGNORE = -100  # label the loss skips (torch.nn.CrossEntropyLoss's ignore_index)


@dataclass(frozen=True)
class EncodedExample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE where the prompt is
    line: int

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def segments(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, learned) pieces, in order."""
    if not getattr(tokenizer, "chat_template", None):
        raise FinetuneError(
            "the model's tokenizer has no chat template, so prompts cannot be told from replies; fine-tune a chat "
            "(instruct) model or add a chat_template to its tokenizer_config.json"
        )
    out: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise FinetuneError(
                "the chat template does not render a conversation as a prefix of its continuation (it rewrites "
                "earlier turns), so assistant turns cannot be masked; use a model with a ChatML-like template"
            )
        reply = full[len(prompt) :]
        learned = reply.rstrip()
        out += [(prompt[len(done) :], False), (learned, True), (reply[len(learned) :], False)]
        done = full
    rest = _render(tokenizer, messages, generation_prompt=False)[len(done) :]
    out.append((rest, False))
    return [(text, learned) for text, learned in out if text]


def encode_example(tokenizer: Any, example: ChatExample, max_length: int) -> EncodedExample:
    """Token ids and labels of one conversation; DataError (naming its line) when it exceeds `max_length`."""
    ids: list[int] = []
    labels: list[int] = []
    for text, learned in segments(tokenizer, example.messages):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if learned else [IGNORE] * len(piece)
    if len(ids) > max_length:
        raise DataError(
            f"{example.source}: line {example.line}: {len(ids)} tokens after the chat template, more than max_length "
            f"{max_length}; shorten the conversation, split it, or raise max_length (--max-length) up to the "
            "model's context"
        )
    return EncodedExample(tuple(ids), tuple(labels), example.line)


def encode_all(tokenizer: Any, examples: Sequence[ChatExample], max_length: int) -> list[EncodedExample]:
    """Encode every example, reporting all too-long lines at once."""
    out: list[EncodedExample] = []
    problems: list[str] = []
    for example in examples:
        try:
            out.append(encode_example(tokenizer, example, max_length))
        except DataError as e:
            problems.append(str(e).split(": ", 1)[1])
    if problems:
        raise DataError(format_problems(Path(examples[0].source), problems))
    return out
