"""Request -> prompt token ids, one implementation for every path: the model's own chat template.

The engine tokenizes each request once (it needs the count to place it) and hands the ids to the
backend in `GenerationRequest.prompt_ids`; a backend used on its own tokenizes with this same class,
built from its folder's tokenizer files, so both give identical ids. Chat `messages` need the model's
chat template: a model without one is refused on every path with the same message (send a raw
`prompt`), never joined with newlines on one path and refused on another.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends.base import GenerationRequest
from backends.detok import StreamDecoder, decoder_factory

log = logging.getLogger(__name__)


class NoChatTemplateError(ValueError):
    """Chat messages were sent to a model whose tokenizer has no chat template."""


class PromptEncoder:
    """A tokenizer (backends/hf_tokenizer.py, else transformers') behind prompt ids and streaming decoders."""

    def __init__(self, tokenizer: Any, name: str = "the model") -> None:
        self.tokenizer = tokenizer
        self.name = name
        self._lock = threading.Lock()  # fast tokenizers are not safe to call from several threads at once
        self._decoders: Callable[[list[int]], StreamDecoder] = decoder_factory(tokenizer)

    @classmethod
    def from_folder(cls, folder: str | Path, gguf_file: str | None = None, transformers: bool = False) -> PromptEncoder:
        """The tokenizer saved in an HF checkpoint or an export folder (tokenizer.json + tokenizer_config.json).

        A folder with tokenizer.json is read without transformers (backends/hf_tokenizer.py): importing
        transformers' tokenizers imports torch, ~375 MB resident, which the ONNX path never needs otherwise.
        `transformers=True` (the torch backend, which loads torch anyway), a GGUF file, a folder without
        tokenizer.json or a tokenizer that needs transformers' load-time rebuild use AutoTokenizer.
        """
        folder = Path(folder)
        why = "asked for transformers" if transformers else "a GGUF file" if gguf_file else ""
        if not why and not (folder / "tokenizer.json").is_file():
            why = "no tokenizer.json (a slow-only or GGUF-only folder)"
        if not why:
            from backends.hf_tokenizer import HFTokenizer, UnsupportedTokenizer

            try:
                return cls(HFTokenizer.from_folder(folder), name=folder.name)
            except UnsupportedTokenizer as exc:
                why = str(exc)
        log.debug("tokenizer of %s through transformers' AutoTokenizer: %s", folder, why)
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        return cls(AutoTokenizer.from_pretrained(str(folder), **kwargs), name=folder.name)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, request: GenerationRequest) -> list[int]:
        """The request's prompt ids: given ids as they are, else the chat template or the raw prompt."""
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        with self._lock:
            if request.messages is not None:
                if not self.has_chat_template:
                    raise NoChatTemplateError(
                        f"{self.name} has no chat template, so chat messages cannot be turned into a prompt; "
                        "send a raw `prompt` (Engine.complete, /v1/completions) or add a chat_template to its "
                        "tokenizer_config.json"
                    )
                ids = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
            else:
                ids = self.tokenizer.encode(request.prompt or "")
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("the prompt encodes to no tokens (it is empty after tokenization); send some text")
        return ids

    def decoder(self, prompt_ids: list[int]) -> StreamDecoder:
        """A fresh streaming decoder for one reply (primed with the prompt where the tokenizer needs context)."""
        return self._decoders(prompt_ids)
