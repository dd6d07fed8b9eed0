"""The model's own chat template, rendered the way transformers renders it, without importing transformers.

An exported folder carries the HF tokenizer files; the template lives in tokenizer_config.json
("chat_template", a string or a list of named templates) or, for tokenizers saved by newer transformers,
in chat_template.jinja. Rendering mirrors transformers' `apply_chat_template`: a sandboxed jinja2
environment with trim_blocks/lstrip_blocks, the loopcontrols extension, `raise_exception`, `strftime_now`,
a `tojson` that does not HTML-escape, and the special tokens passed as variables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from backends.base import BackendError

_SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
)


def _token_text(value: Any) -> Any:
    """Special tokens are saved either as plain strings or as AddedToken dicts with a "content" field."""
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [_token_text(v) for v in value]
    return value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BackendError(
            f"{path} is not valid JSON ({exc}); re-export the model to rewrite its tokenizer files"
        ) from exc
    return data if isinstance(data, dict) else {}


@dataclass
class ChatTemplate:
    """A compiled chat template plus the variables transformers would pass to it."""

    source: str
    special_tokens: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._compiled = env.from_string(self.source)
        except jinja2.exceptions.TemplateError as exc:
            raise BackendError(f"the model's chat template does not compile: {exc}") from exc

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`, ending with the assistant header when add_generation_prompt."""
        import jinja2

        try:
            return self._compiled.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as exc:
            raise ValueError(f"the model's chat template rejected these messages: {exc}") from exc


def load_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The chat template shipped in `model_dir`, or None when the folder has none (raw prompts still work)."""
    folder = Path(model_dir)
    config = _read_json(folder / "tokenizer_config.json")
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: transformers uses "default" for plain chat
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    if not source and (folder / "chat_template.jinja").is_file():
        source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not source:
        return None
    specials = {k: _token_text(v) for k, v in _read_json(folder / "special_tokens_map.json").items()}
    specials.update({k: _token_text(config[k]) for k in _SPECIAL_KEYS if config.get(k) is not None})
    return ChatTemplate(source, {k: v for k, v in specials.items() if k in _SPECIAL_KEYS and v is not None})
