"""Rebuild a byte-level BPE (GPT-2 style) tokenizer from the vocab and merges stored in a GGUF file.

The tokenizer transformers derives from a GGUF is a LlamaTokenizerFast with a mixed decoder that adds a
second BOS before `<|im_start|>`, and onnxruntime-genai's tokenizer returns -1 ids for it. Building the
tokenizer.json ourselves from the same vocab and merges gives one tokenizer that transformers and
onnxruntime-genai read identically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's `tokenizer.ggml.pre` names -> the matching pre-tokenizer of the original HF tokenizer
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell"}
_PLAIN_GPT2 = {"gpt-2", "gpt2", "default", "phi-2", "stablelm2", "olmo", "jais", "poro-chat", "viking"}
_SPLIT_THEN_BYTES = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


@dataclass(frozen=True)
class GgufVocab:
    """The tokenizer part of a GGUF's metadata."""

    model: str  # tokenizer.ggml.model, "gpt2" for byte-level BPE
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str | None


def vocab_from_fields(fields: dict[str, Any]) -> GgufVocab:
    """Collect the tokenizer fields from `{key: value}` GGUF metadata (values already decoded)."""

    def opt_int(key: str) -> int | None:
        v = fields.get(key)
        return int(v) if v is not None else None

    tokens = list(fields.get("tokenizer.ggml.tokens") or [])
    return GgufVocab(
        model=str(fields.get("tokenizer.ggml.model", "")),
        pre=str(fields.get("tokenizer.ggml.pre", "default")),
        tokens=tokens,
        token_types=list(fields.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)),
        merges=list(fields.get("tokenizer.ggml.merges") or []),
        bos_id=opt_int("tokenizer.ggml.bos_token_id"),
        eos_id=opt_int("tokenizer.ggml.eos_token_id"),
        unk_id=opt_int("tokenizer.ggml.unknown_token_id"),
        pad_id=opt_int("tokenizer.ggml.padding_token_id"),
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=fields.get("tokenizer.chat_template"),
    )


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLIT_THEN_BYTES:
        split = pre_tokenizers.Split(Regex(_SPLIT_THEN_BYTES[pre]), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in _PLAIN_GPT2:
        log.warning("GGUF pre-tokenizer %r is not in the known table; using GPT-2's split, ids may differ", pre)
    return byte_level


def _merge_pair(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep:
        raise ValueError(f"malformed GGUF merge {merge!r} (expected 'left right')")
    return left, right


def build_bpe_tokenizer(vocab: GgufVocab, context_length: int) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer equivalent to the GGUF's GPT-2 style BPE, with its special tokens."""
    if vocab.model != "gpt2":
        raise ValueError(f"tokenizer model {vocab.model!r} is not byte-level BPE ('gpt2')")
    ids = {tok: i for i, tok in enumerate(vocab.tokens)}
    if len(ids) != len(vocab.tokens):
        raise ValueError("the GGUF vocabulary has duplicate tokens")
    bpe = models.BPE(
        vocab=ids,
        merges=[_merge_pair(m) for m in vocab.merges],
        unk_token=None,
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(vocab.pre)
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(vocab.tokens, vocab.token_types, strict=True)
        if ty in (_CONTROL, _UNKNOWN)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(vocab.tokens, vocab.token_types, strict=True)
        if ty == _USER_DEFINED
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    if vocab.add_bos and vocab.bos_id is not None:
        bos = vocab.tokens[vocab.bos_id]
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab.bos_id)]
                ),
            ]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    def name(i: int | None) -> str | None:
        return vocab.tokens[i] if i is not None and 0 <= i < len(vocab.tokens) else None

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=name(vocab.bos_id),
        eos_token=name(vocab.eos_id),
        unk_token=name(vocab.unk_id),
        pad_token=name(vocab.pad_id if vocab.pad_id is not None else vocab.eos_id),
        model_max_length=context_length,
        clean_up_tokenization_spaces=False,
        add_bos_token=vocab.add_bos,
        model_input_names=["input_ids", "attention_mask"],  # decoder LMs take no token_type_ids in generate()
    )
    if vocab.chat_template:
        fast.chat_template = vocab.chat_template
    return fast
