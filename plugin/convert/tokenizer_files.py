"""Copy the tokenizer (and chat template) so onnxruntime-genai's tokenizer reads the same ids as transformers.

onnxruntime-genai reads `tokenizer.json` + `tokenizer_config.json` (chat template included there);
transformers 4.57 may store the template in `chat_template.jinja` instead, so it is folded back into
`tokenizer_config.json` here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from plugin.convert.errors import ExportError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
CONFIG_FILES = ("config.json", "generation_config.json")


def copy_tokenizer(source: Path, folder: Path) -> list[str]:
    """Copy tokenizer + HF config files from `source` into `folder`; return the names copied."""
    if not (source / "tokenizer.json").is_file():
        raise ExportError(
            f"{source} has no tokenizer.json; onnxruntime-genai needs a fast (tokenizer.json) tokenizer. "
            "Save one with AutoTokenizer.from_pretrained(...).save_pretrained(folder)."
        )
    copied = []
    for name in TOKENIZER_FILES + CONFIG_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
            copied.append(name)
    template = folder / "chat_template.jinja"
    config_path = folder / "tokenizer_config.json"
    if template.is_file() and config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not config.get("chat_template"):
            config["chat_template"] = template.read_text(encoding="utf-8")
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return copied
