"""`finetune()`: data -> checks -> LoRA training -> merged checkpoint published atomically into the output folder.

Order matters for "nothing half-written": every check that can fail on the user's input (data lines, lengths,
the output folder, the device) runs before training, and the output appears only at the end, renamed into
place from a hidden sibling folder (plugin/cache.py), so an error or a kill leaves the output as it was.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from plugin.cache import partial_dir, publish
from plugin.finetune.data import ChatDataset, load_chat_jsonl, split_held_out
from plugin.finetune.errors import FinetuneError
from plugin.finetune.masking import encode_all
from plugin.finetune.placement import TrainingPlacement, place_training
from plugin.finetune.report import RECORD_FILE, FinetuneRecord, write_loss_curve, write_report
from plugin.finetune.trainer import LoraSettings, eval_loss, merge, train, wrap_lora

log = logging.getLogger(__name__)

_VERSIONED = ("torch", "transformers", "peft")


@dataclass(frozen=True)
class FinetuneResult:
    path: Path  # the merged checkpoint folder (the output)
    placement: TrainingPlacement
    record: FinetuneRecord

    @property
    def eval_loss_before(self) -> float | None:
        return self.record.eval_loss_before

    @property
    def eval_loss_after(self) -> float | None:
        return self.record.eval_loss_after


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output that holds anything but an earlier fine-tune (and that one unless `overwrite`)."""
    if not output.exists():
        return
    if not output.is_dir():
        raise FinetuneError(f"output {output} is a file; pass a folder path for the fine-tuned checkpoint")
    if not any(output.iterdir()):
        return
    if not (output / RECORD_FILE).is_file():
        raise FinetuneError(
            f"output folder {output} is not empty and holds no accelserve fine-tune (no {RECORD_FILE}); choose a "
            "new or empty folder so nothing of yours is overwritten"
        )
    if not overwrite:
        raise FinetuneError(
            f"output folder {output} already holds a fine-tune; pass overwrite=True (--force) to replace it, "
            "or choose another folder"
        )


def _versions() -> dict[str, str]:
    out = {}
    for dist in _VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def _to_float(x: float) -> float | None:
    return None if x != x else round(float(x), 5)  # nan (no held-out set) -> None


def _copy_tokenizer(source: Path, dest: Path) -> None:
    """The base model's tokenizer files, byte for byte: serving and export must see the same ids."""
    from plugin.convert.tokenizer_files import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count for the block, restored after (None: unchanged)."""
    import torch

    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _load_base(path: Path, placement: TrainingPlacement) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, placement.dtype)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(placement.torch_device)


def finetune(
    model: str | Path,
    data: str | Path,
    output: str | Path,
    *,
    eval_data: str | Path | None = None,
    eval_fraction: float = 0.1,
    settings: LoraSettings | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    home: Path | None = None,
    threads: int | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """LoRA-fine-tune `model` on chat-format `data` (.jsonl) and save the merged checkpoint into `output`.

    `eval_data` is a held-out file; without it `eval_fraction` of `data` is held out. `settings` (or keyword
    overrides such as steps=30, learning_rate=1e-3) are the hyper-parameters. `device`: auto (a real GPU in
    bf16, else the CPU in fp32), gpu or cpu; never an NPU. `threads`: torch's CPU threads while training (None:
    torch's default; on a CPU other jobs keep busy, 1 thread avoids threads waiting on each other). Raises
    DataError / FinetuneError with the fix.
    """
    from transformers import AutoTokenizer

    from plugin.engine.devices import discover_devices
    from plugin.models.resolve import resolve_model

    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise FinetuneError(f"threads must be a positive integer (got {threads!r}), or None for torch's default")
    settings = settings or LoraSettings()
    try:
        settings = replace(settings, **overrides)
    except TypeError as e:
        names = ", ".join(LoraSettings.__dataclass_fields__)
        raise FinetuneError(f"unknown fine-tuning option ({e}); the options are {names}") from e
    out = Path(output).expanduser().resolve()
    check_output(out, overwrite)
    dataset = load_chat_jsonl(data)
    train_examples, eval_examples, eval_source = _split(dataset, eval_data, eval_fraction, settings.seed)
    resolved = resolve_model(model, home=home)
    tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
    context = int(resolved.profile.context_length)
    if settings.max_length is None:
        settings = replace(settings, max_length=min(context, 1024))
    elif settings.max_length > context:
        raise FinetuneError(f"max_length {settings.max_length} exceeds the model's context ({context}); lower it")
    train_set = encode_all(tokenizer, train_examples, settings.max_length)
    eval_set = encode_all(tokenizer, eval_examples, settings.max_length) if eval_examples else []
    placement = place_training(discover_devices(), device)
    log.info("training on %s (%s): %s", placement.device_id, placement.dtype, placement.reason)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch_size = min(settings.batch_size, len(train_set))

    with torch_threads(threads):
        lora = wrap_lora(_load_base(resolved.path, placement), settings)
        before = eval_loss(lora, eval_set, pad_id, placement.torch_device, batch_size)
        history = train(lora, train_set, replace(settings, batch_size=batch_size), placement, pad_id, progress)
        after = eval_loss(lora, eval_set, pad_id, placement.torch_device, batch_size)
        merged = merge(lora)
    log.info("held-out loss %.4f -> %.4f", before, after)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(out)
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        _copy_tokenizer(Path(resolved.path), tmp)
        curve = write_loss_curve(history.losses, _to_float(before), _to_float(after), tmp)
        notes = [] if curve else ["no loss curve: matplotlib is not installed (the 'bench' extra)"]
        record = FinetuneRecord(
            base_model=str(model),
            base_model_name=resolved.profile.name,
            base_path=str(resolved.path),
            data_file=str(dataset.path),
            data_sha256=dataset.sha256,
            eval_source=eval_source,
            train_examples=len(train_set),
            eval_examples=len(eval_set),
            hyperparameters={
                **asdict(replace(settings, batch_size=batch_size)),
                "optimizer": "AdamW",
                "threads": threads,
            },
            placement=asdict(placement),
            steps=len(history.losses),
            seconds=round(history.seconds, 2),
            tokens=history.tokens,
            tokens_per_s=round(history.tokens_per_s, 1),
            train_loss_first=round(history.losses[0], 5),
            train_loss_last=round(history.losses[-1], 5),
            eval_loss_before=_to_float(before),
            eval_loss_after=_to_float(after),
            losses=[round(x, 5) for x in history.losses],
            loss_curve=curve,
            versions=_versions(),
            notes=notes,
        )
        write_report(record, tmp)
        check_output(out, overwrite)  # the folder may have been filled while we trained
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("fine-tuned checkpoint -> %s", out)
    return FinetuneResult(out, placement, record)


def _split(
    dataset: ChatDataset, eval_data: str | Path | None, fraction: float, seed: int
) -> tuple[tuple[Any, ...], tuple[Any, ...], str]:
    if eval_data is not None:
        held = load_chat_jsonl(eval_data)
        return dataset.examples, held.examples, f"{held.path.name}, sha256 {held.sha256}"
    train_examples, held = split_held_out(dataset.examples, fraction, seed)
    what = f"held-out split of the data ({fraction:.0%}, seed {seed})" if held else "none (too few examples)"
    return train_examples, held, what
