"""A Hugging Face fast tokenizer without transformers: `tokenizer.json` + `tokenizer_config.json` + jinja2.

`from transformers import AutoTokenizer` imports torch (through `transformers.utils.generic`): ~375 MB
resident before any model, which is most of the ONNX serving path's memory. Serving only needs encode,
decode and the chat template, so this class gives exactly those with the same ids and text as transformers
4.57's `PreTrainedTokenizerFast`: the `tokenizers` library for the ids and the chat template rendered in
the same sandboxed jinja2 environment with the same filters, globals and variables. `load` returns None
(with the reason) for folders whose tokenizer transformers would rebuild or alter at load time, so the
caller falls back to AutoTokenizer instead of serving different ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

# The special-token attributes transformers passes to the chat template (`special_tokens_map`), in its order.
SPECIAL_TOKEN_ATTRIBUTES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
)
# Fast tokenizer classes whose __init__ rewrites the post-processor from add_bos_token/add_eos_token
# (`update_post_processor`), with their defaults. Reproduced here; any other class keeps tokenizer.json's.
_POST_PROCESSOR_DEFAULTS = {
    "LlamaTokenizerFast": (True, False),
    "LlamaTokenizer": (True, False),
    "CodeLlamaTokenizerFast": (True, False),
    "CodeLlamaTokenizer": (True, False),
    "GemmaTokenizerFast": (True, False),
    "GemmaTokenizer": (True, False),
    "GPTNeoXTokenizerFast": (False, False),
}
# Classes that transformers handles through extra logic this module does not reproduce.
_UNSUPPORTED_CLASSES = {"CohereTokenizerFast", "CohereTokenizer"}


class UnsupportedTokenizer(ValueError):
    """The folder's tokenizer needs transformers to load identically (the reason is the message)."""


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialized AddedToken."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return str(value["content"])
    raise UnsupportedTokenizer(f"unreadable special token {value!r}")


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
    # As transformers: jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def compile_chat_template(template: str) -> Any:
    """The template in transformers' environment (sandboxed, trim/lstrip blocks, loopcontrols, same helpers)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (used when the config sets clean_up_tokenization_spaces)."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


@dataclass
class SpecialTokens:
    """The special tokens transformers would set from tokenizer_config.json / special_tokens_map.json."""

    values: dict[str, Any]

    def as_template_kwargs(self) -> dict[str, Any]:
        """transformers' `special_tokens_map`: only the attributes that are set (truthy)."""
        return {k: self.values[k] for k in SPECIAL_TOKEN_ATTRIBUTES if self.values.get(k)}


class HFTokenizer:
    """The subset of `PreTrainedTokenizerFast` serving uses, over `tokenizers.Tokenizer` and jinja2."""

    def __init__(self, backend: Any, config: dict[str, Any], special: SpecialTokens, chat_template: str | None):
        self.backend_tokenizer = backend
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._special = special
        for name in SPECIAL_TOKEN_ATTRIBUTES[:-1]:
            setattr(self, name, special.values.get(name))

    @classmethod
    def from_folder(cls, folder: str | Path) -> HFTokenizer:
        """Load `folder`'s tokenizer.json; raises UnsupportedTokenizer when transformers is needed for the same ids."""
        from tokenizers import Tokenizer, processors

        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        klass = str(config.get("tokenizer_class") or "")
        if klass in _UNSUPPORTED_CLASSES:
            raise UnsupportedTokenizer(f"{klass} adjusts the tokenizer at load time in ways not reproduced here")
        rebuilt = config.get("add_prefix_space") is not None and klass in _POST_PROCESSOR_DEFAULTS
        if config.get("from_slow") or rebuilt:
            raise UnsupportedTokenizer(f"{klass} with from_slow/add_prefix_space is rebuilt from the slow tokenizer")
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        special = _special_tokens(folder, config)
        if klass in _POST_PROCESSOR_DEFAULTS:
            bos_default, eos_default = _POST_PROCESSOR_DEFAULTS[klass]
            add_bos = bool(config.get("add_bos_token", bos_default))
            add_eos = bool(config.get("add_eos_token", eos_default))
            bos, eos = special.values.get("bos_token"), special.values.get("eos_token")
            if (add_bos and bos is None) or (add_eos and eos is None):
                raise UnsupportedTokenizer(f"{klass} adds bos/eos but the folder does not name them")
            single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
            pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
            specials = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
            backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        return cls(backend, config, special, _chat_template(folder, config))

    # ---- ids ---------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(t) for t in token_ids]
        text = self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = (
            self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        )
        return clean_up_tokenization(text) if clean else text

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend_tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.bos_token) if self.bos_token else None

    @property
    def eos_token_id(self) -> int | None:
        return self.convert_tokens_to_ids(self.eos_token) if self.eos_token else None

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        return self._special.as_template_kwargs()

    # ---- chat --------------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        """As transformers for one conversation: render with special tokens + kwargs, encode without specials."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json chat_template)")
        template = compile_chat_template(self.chat_template)
        variables = {**self.special_tokens_map, **kwargs}
        text = template.render(
            messages=conversation, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise UnsupportedTokenizer(f"{path.name} is not a JSON object")
    return data


def _special_tokens(folder: Path, config: dict[str, Any]) -> SpecialTokens:
    """tokenizer_config.json's special tokens; special_tokens_map.json overrides them only for a legacy config
    (one without added_tokens_decoder), as transformers 4.57 does."""
    values: dict[str, Any] = {}
    token_map = {} if "added_tokens_decoder" in config else _read_json(folder / "special_tokens_map.json")
    for name in SPECIAL_TOKEN_ATTRIBUTES:
        raw = token_map[name] if token_map.get(name) else config.get(name)
        if name == "additional_special_tokens":
            values[name] = [_token_text(t) for t in raw or []]
        else:
            values[name] = _token_text(raw)
    return SpecialTokens(values)


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json, as in transformers 4.57; named templates are refused."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    raise UnsupportedTokenizer("tokenizer_config.json holds several named chat templates")
