"""Convert a GGUF file into a plain HF checkpoint folder (safetensors + config + rebuilt tokenizer).

Every backend reads HF folders, so a GGUF is converted once: transformers dequantizes the weights, we
save them as fp32 safetensors (exactly the GGUF's dequantized values, no second rounding) and write a
tokenizer rebuilt from the GGUF vocab (see gguf_tokenizer for why), with bos/eos/pad ids agreeing in
config.json, generation_config.json and tokenizer_config.json.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugin.models.errors import ModelSourceError
from plugin.models.gguf_tokenizer import GgufVocab, build_bpe_tokenizer, vocab_from_fields

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufInfo:
    """What we read from a GGUF before converting it."""

    path: Path
    architecture: str
    name: str | None
    tensor_count: int
    vocab: GgufVocab


def _bad_gguf(path: Path, problem: str) -> ModelSourceError:
    return ModelSourceError(
        f"{path} is not a usable GGUF file: {problem}. Re-download or re-export it (e.g. with llama.cpp's "
        "convert_hf_to_gguf.py), or pass the original HF checkpoint folder instead."
    )


def read_gguf_info(path: Path) -> GgufInfo:
    """Open and check a GGUF: magic, metadata, every tensor's bytes present, architecture supported."""
    from gguf import GGUFReader

    path = Path(path)
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise _bad_gguf(path, f"it does not start with the GGUF magic bytes (found {magic!r})")
    try:
        reader = GGUFReader(path)
        fields = {k: f.contents() for k, f in reader.fields.items()}
        tensors = reader.tensors
        for t in tensors:
            if t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor {t.name} has {t.data.nbytes} of its {t.n_bytes} bytes")
    except (ValueError, IndexError, OSError, KeyError, TypeError) as e:
        raise _bad_gguf(path, f"it is corrupt or truncated ({e})") from e
    arch = fields.get("general.architecture")
    if not arch:
        raise _bad_gguf(path, "its metadata has no general.architecture")
    if not tensors:
        raise _bad_gguf(path, "it holds no tensors")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelSourceError(
            f"{path}: GGUF architecture {arch!r} cannot be converted by the installed transformers (it converts "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}). Pass an HF checkpoint folder of the model instead."
        )
    vocab = vocab_from_fields(fields)
    if not vocab.tokens:
        raise _bad_gguf(path, "it carries no tokenizer vocabulary (tokenizer.ggml.tokens)")
    return GgufInfo(path, str(arch), fields.get("general.name"), len(tensors), vocab)


@contextmanager
def _steps(total: int, description: str):
    """A rich progress bar over conversion steps (on stderr, so a CLI's stdout stays clean)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total)
        timings: dict[str, float] = {}

        @contextmanager
        def step(label: str):
            progress.update(task, description=f"{description}: {label}")
            start = time.perf_counter()
            yield
            timings[label] = round(time.perf_counter() - start, 2)
            log.info("%s: %s took %.2f s", description, label, timings[label])
            progress.advance(task)

        yield step, timings


def _tokenizer_for(info: GgufInfo, folder: Path, context_length: int):
    if info.vocab.model == "gpt2":
        return build_bpe_tokenizer(info.vocab, context_length)
    from transformers import AutoTokenizer

    log.warning(
        "%s: tokenizer model %r is not byte-level BPE; using transformers' GGUF tokenizer, whose ids are not "
        "checked against onnxruntime-genai",
        info.path,
        info.vocab.model,
    )
    return AutoTokenizer.from_pretrained(info.path.parent, gguf_file=info.path.name)


def convert_gguf(path: Path, out: Path, info: GgufInfo | None = None) -> dict[str, Any]:
    """Write the HF checkpoint for GGUF `path` into the (empty) folder `out`; return facts for the marker.

    `info` is the already checked metadata from `read_gguf_info`, so the file is not parsed twice.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    with _steps(5, f"converting {path.name}") as (step, timings):
        with step("read metadata"):
            info = info if info is not None else read_gguf_info(path)
        with step("dequantize weights"):
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            config = model.config
        with step("rebuild tokenizer"):
            context = int(getattr(config, "max_position_embeddings", 0) or 2048)
            tokenizer = _tokenizer_for(info, out, context)
            tokenizer.save_pretrained(out, save_jinja_files=False)
        with step("write configs"):
            bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
            config.bos_token_id, config.eos_token_id, config.pad_token_id = bos, eos, pad
            model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
        with step("write safetensors"):
            model.save_pretrained(out, safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "source": str(path),
        "architecture": config.model_type,
        "gguf_architecture": info.architecture,
        "num_parameters": n_params,
        "dtype": "float32",
        "tokenizer": "rebuilt byte-level BPE" if info.vocab.model == "gpt2" else "transformers GGUF tokenizer",
        "step_seconds": timings,
    }
