"""What the installed transformers and Optimum say about model types, read once per set of library versions.

Reading them means importing transformers and Optimum's exporter, and torch with them (~400 MB resident).
A serving process that only loads an export from the cache must not pay that, so the facts are memoised
on disk under the accelserve home, keyed by the libraries' versions: an upgrade recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from plugin.home import accelserve_home

log = logging.getLogger(__name__)

TASK = "text-generation-with-past"
FACTS_FORMAT = 1
FACT_LIBRARIES = ("transformers", "optimum", "optimum-onnx")


@dataclass(frozen=True)
class LibraryFacts:
    versions: dict[str, str]
    optimum_types: tuple[str, ...]  # model_types Optimum's ONNX exporter exports for TASK
    causal_lm_classes: dict[str, str]  # model_type -> transformers' causal-LM class name
    image_text: dict[str, str | None]  # Optimum types whose config has a vision_config -> their text model_type


def _versions() -> dict[str, str]:
    out = {"format": str(FACTS_FORMAT)}
    for dist in FACT_LIBRARIES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def _compute(versions: dict[str, str]) -> LibraryFacts:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = tuple(
        sorted(t for t, exporters in TasksManager._SUPPORTED_MODEL_TYPE.items() if TASK in exporters.get("onnx", {}))
    )
    image_text: dict[str, str | None] = {}
    for model_type in types:
        try:
            sub_configs = dict(getattr(type(AutoConfig.for_model(model_type)), "sub_configs", None) or {})
        except (KeyError, ValueError):  # no config class in this transformers: refused for that reason instead
            continue
        if "vision_config" in sub_configs:
            image_text[model_type] = getattr(sub_configs.get("text_config"), "model_type", None)
    return LibraryFacts(versions, types, dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), image_text)


def memo_path(versions: dict[str, str], home: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:16]
    return (home or accelserve_home()) / "memo" / f"library-facts-{digest}.json"


def _read(path: Path, versions: dict[str, str]) -> LibraryFacts | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("versions") != versions:
            return None
        return LibraryFacts(
            versions, tuple(data["optimum_types"]), dict(data["causal_lm_classes"]), dict(data["image_text"])
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the unreadable library-facts memo %s (%s); recomputing it", path, e)
        return None


def _write(path: Path, facts: LibraryFacts) -> None:
    """Atomically (a reader never sees half a file); a read-only home just means no memo."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(facts), sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not memoise library facts at %s (%s); they are recomputed in each process", path, e)


@lru_cache(maxsize=1)
def library_facts() -> LibraryFacts:
    """The facts for the installed versions: from the memo, else computed (imports the libraries) and memoised."""
    versions = _versions()
    path = memo_path(versions)
    facts = _read(path, versions)
    if facts is None:
        facts = _compute(versions)
        _write(path, facts)
    return facts
