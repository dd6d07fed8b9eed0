"""backends/hf_tokenizer.py gives transformers' ids and text without importing transformers (or torch).

Three tokenizer families built here in well under a second: the tiny fixtures' byte-level BPE with ChatML
(template saved as chat_template.jinja), a SentencePiece-style Metaspace BPE declared as LlamaTokenizerFast
(add_bos_token post-processor, a Llama-2 template with raise_exception), and a byte-level BPE whose
template uses tojson, raise_exception and strftime_now, with clean-up of tokenization spaces and a legacy
special_tokens_map.json. Each is compared with transformers' AutoTokenizer on the same folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from backends.base import GenerationRequest
from backends.hf_tokenizer import HFTokenizer, UnsupportedTokenizer
from backends.prompt import PromptEncoder

from tiny_models import CORPUS, build_tokenizer

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
TOOLS_TEMPLATE = """{%- if messages | length == 0 %}{{ raise_exception('no messages') }}{% endif -%}
{{ bos_token }}{% set today = strftime_now('%Y') %}
{%- for message in messages %}
  {%- if message.role not in ['system', 'user', 'assistant'] %}
    {{- raise_exception('unknown role ' + message.role) }}
  {%- endif %}
<|{{ message.role }}|>{{ message | tojson }}
{{ message.content | tojson(indent=2) }}{{ eos_token }}
  {% if loop.last and message.role == 'system' %}{% break %}{% endif %}
{% endfor %}
{%- if add_generation_prompt %}<|assistant|>
{% endif %}"""

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello, how are you today?"},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Héllo wörld, naïve café 東京 🙂"},
        {"role": "assistant", "content": "Hello! I am fine, thank you."},
        {"role": "user", "content": 'Numbers: 0 1 2 3 <tag> & "quotes" isn\'t it ?'},
    ],
]
TEXTS = ["The capital of France is Paris .", " leading space, isn't it ?", "naïve café 東京 🙂 <|im_end|> x", ""]


def _spm_tokenizer(folder: Path) -> Path:
    """A SentencePiece-style (Metaspace) BPE declared as a Llama tokenizer: bos added by the post-processor."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": {
            "__type": "AddedToken",
            "content": "<unk>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "special": True,
        },
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "chat_template": LLAMA2_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _tools_tokenizer(folder: Path) -> Path:
    """Byte-level BPE; template with tojson/raise_exception/strftime_now; legacy special_tokens_map.json."""
    build_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("added_tokens_decoder", None)
    config.pop("eos_token", None)
    config["chat_template"] = TOOLS_TEMPLATE
    config["clean_up_tokenization_spaces"] = True
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}), encoding="utf-8")
    return folder


@pytest.fixture(scope="module", params=["chatml", "llama-spm", "tools"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp(f"tok-{request.param}")
    if request.param == "chatml":
        build_tokenizer(where)
        return where
    return _spm_tokenizer(where) if request.param == "llama-spm" else _tools_tokenizer(where)


def _pair(folder: Path):
    from transformers import AutoTokenizer

    return HFTokenizer.from_folder(folder), AutoTokenizer.from_pretrained(str(folder))


def test_chat_ids_equal_transformers(folder: Path) -> None:
    ours, theirs = _pair(folder)
    assert ours.chat_template == theirs.chat_template
    for chat in CHATS:
        for generation_prompt in (True, False):
            expected = theirs.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True)
            got = ours.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True)
            assert got == list(expected), (chat, generation_prompt)
            text = theirs.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=False)
            assert ours.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=False) == text


def test_encode_decode_and_special_ids_equal_transformers(folder: Path) -> None:
    ours, theirs = _pair(folder)
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.special_tokens_map == theirs.special_tokens_map
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
        for token in ids:
            assert ours.decode([token], skip_special_tokens=False) == theirs.decode([token], skip_special_tokens=False)


def test_prompt_encoder_uses_it_and_streams_the_same_text(folder: Path) -> None:
    from transformers import AutoTokenizer

    encoder = PromptEncoder.from_folder(folder)
    assert isinstance(encoder.tokenizer, HFTokenizer)
    reference = PromptEncoder(AutoTokenizer.from_pretrained(str(folder)))
    for chat in CHATS:
        request = GenerationRequest(messages=chat)
        ids = encoder.encode(request)
        assert ids == reference.encode(GenerationRequest(messages=chat))
        streams = []
        for enc in (encoder, reference):
            decoder = enc.decoder(ids[:3])
            streams.append("".join(decoder.add(t) for t in ids[3:]) + decoder.flush())
        assert streams[0] == streams[1]


def test_template_errors_are_raised_as_in_transformers(tmp_path: Path) -> None:
    import jinja2

    tok = HFTokenizer.from_folder(_spm_tokenizer(tmp_path / "spm"))
    with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}], add_generation_prompt=True)


def test_transformers_is_used_when_asked_or_needed(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    build_tokenizer(folder)
    assert isinstance(PromptEncoder.from_folder(folder).tokenizer, HFTokenizer)
    assert not isinstance(PromptEncoder.from_folder(folder, transformers=True).tokenizer, HFTokenizer)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "CohereTokenizerFast"  # load-time logic not reproduced: transformers loads it
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(UnsupportedTokenizer, match="CohereTokenizerFast"):
        HFTokenizer.from_folder(folder)


def test_serving_tokenization_imports_neither_torch_nor_transformers(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    build_tokenizer(folder)
    script = (
        "import sys\n"
        "from backends.base import GenerationRequest\n"
        "from backends.prompt import PromptEncoder\n"
        f"enc = PromptEncoder.from_folder({str(folder)!r})\n"
        "ids = enc.encode(GenerationRequest(messages=[{'role': 'system', 'content': 'Be brief.'},"
        " {'role': 'user', 'content': 'Hello?'}]))\n"
        "d = enc.decoder(ids)\n"
        "text = ''.join(d.add(t) for t in ids) + d.flush()\n"
        "assert ids and text, (ids, text)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.slow
def test_default_model_ids_equal_transformers() -> None:
    from transformers import AutoTokenizer

    from plugin.models.resolve import resolve_model

    folder = resolve_model("default").path
    ours, theirs = HFTokenizer.from_folder(folder), AutoTokenizer.from_pretrained(str(folder))
    for chat in CHATS:
        expected = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=True) == list(expected)
        ids = list(expected)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text)
