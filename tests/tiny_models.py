"""Tiny random-weight checkpoints that load in well under a second, built locally (no hub access).

Every test that needs "a model" uses these: a byte-level BPE tokenizer trained on a small corpus with
ChatML special tokens, and configs of each supported family shrunk to a few thousand parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "Hello, how are you today? I am fine, thank you very much.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Symbols: !?.,;:'\"()[]{}<>+-*/=_#@&%$",
    "Héllo wörld, naïve café, 東京, Привет мир, مرحبا, 🙂 emoji and ünïcödé text.",
    "def main():\n    return 42\n\nclass Model:\n    pass\n",
    "user assistant system: you are a helpful assistant. What is the answer?",
]

# Shapes small enough to export and run in seconds, large enough to exercise GQA, rotary and MLP paths.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "qwen2": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "mistral": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=None,
    ),
    "phi3": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        original_max_position_embeddings=256,
    ),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
}


def build_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE (GPT-2 style) tokenizer with ChatML specials and save it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a random-weight checkpoint of family `arch` plus tokenizer into `folder`; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bos = tokenizer.convert_tokens_to_ids("<|im_start|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        **TINY_CONFIGS[arch],
    )
    return save_decisive_model(config, folder, seed)


def save_decisive_model(config: PretrainedConfig, folder: Path, seed: int = 0) -> Path:
    """Save a random-weight causal LM of `config` into `folder`.

    Random weights at init scale give near-uniform logits; they are widened so greedy choices are decisive
    and parity tests compare real decisions rather than ties."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(folder, safe_serialization=True)
    return folder
