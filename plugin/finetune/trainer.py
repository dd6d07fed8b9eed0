"""LoRA training with peft: a plain torch loop (batches of whole conversations, AdamW, linear decay), a progress
bar with loss and tokens/s, held-out loss before and after, and the adapter merged into ordinary weights.

A hand loop rather than transformers.Trainer: the data is a few hundred short chats, the loop is thirty
lines, and it reports exactly what the model card records (losses per step, tokens, seconds).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from plugin.finetune.errors import FinetuneError
from plugin.finetune.masking import IGNORE, EncodedExample
from plugin.finetune.placement import TrainingPlacement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSettings:
    """Hyper-parameters, recorded in the model card. Defaults: what taught the default model facts on a CPU."""

    steps: int = 60
    batch_size: int = 8
    learning_rate: float = 2e-3
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"  # every projection of every block; never lm_head
    warmup_steps: int = 3
    max_length: int | None = None  # tokens per conversation; None: the model's context, at most 1024
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "rank", "alpha", "max_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise FinetuneError(f"{name} must be a positive integer (got {getattr(self, name)})")


@dataclass
class TrainingLog:
    losses: list[float] = field(default_factory=list)  # one per step (mean over the batch's learned tokens)
    tokens: int = 0  # tokens fed forward (prompt and reply, no padding)
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def collate(batch: Sequence[EncodedExample], pad_id: int, device: str) -> dict[str, Any]:
    """Right-padded input ids, attention mask and labels (IGNORE on padding)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _batch_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Sum of token losses over learned tokens and their count (so means weight every token alike)."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((shift_labels != IGNORE).sum())


def eval_loss(model: Any, examples: Sequence[EncodedExample], pad_id: int, device: str, batch_size: int) -> float:
    """Mean loss per learned token over `examples` (nan when there are none)."""
    import torch

    if not examples:
        return math.nan
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            loss, n = _batch_loss(model, collate(examples[i : i + batch_size], pad_id, device))
            total += float(loss)
            count += n
    model.train(was_training)
    return total / max(count, 1)


def wrap_lora(model: Any, settings: LoraSettings) -> Any:
    """The base model with LoRA adapters (peft) on its projections; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, config)


def _batches(examples: Sequence[EncodedExample], batch_size: int, steps: int, seed: int):
    """`steps` batches drawn from epochs of a seeded shuffle (every example seen once per epoch)."""
    rng = random.Random(seed)
    pool: list[int] = []
    for _ in range(steps):
        while len(pool) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            pool += fresh
        take, pool = pool[:batch_size], pool[batch_size:]
        yield [examples[i] for i in take]


def train(
    model: Any,
    train_set: Sequence[EncodedExample],
    settings: LoraSettings,
    placement: TrainingPlacement,
    pad_id: int,
    progress: bool = True,
) -> TrainingLog:
    """Run `settings.steps` optimizer steps on the LoRA-wrapped `model`; returns losses, tokens and time."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to a tenth
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        remaining = (settings.steps - step) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.9 * max(0.0, remaining)

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    record = TrainingLog()
    model.train()
    bar = tqdm(total=settings.steps, desc=f"fine-tuning on {placement.device_id}", unit="step", disable=not progress)
    start = time.perf_counter()
    for batch_examples in _batches(train_set, settings.batch_size, settings.steps, settings.seed):
        batch = collate(batch_examples, pad_id, placement.torch_device)
        loss_sum, n = _batch_loss(model, batch)
        loss = loss_sum / max(n, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        record.losses.append(float(loss.detach()))
        record.tokens += int(batch["attention_mask"].sum())
        record.seconds = time.perf_counter() - start
        bar.set_postfix(loss=f"{record.losses[-1]:.3f}", tok_s=f"{record.tokens_per_s:.0f}")
        bar.update(1)
    bar.close()
    model.eval()
    log.info("trained %d steps in %.1f s (%.0f tok/s)", settings.steps, record.seconds, record.tokens_per_s)
    return record


def merge(model: Any) -> Any:
    """The adapters folded into the base weights (W + B·A·alpha/r) in float32: a plain transformers model."""
    import torch

    merged = model.to(torch.float32).merge_and_unload()
    merged.config.dtype = torch.float32
    return merged
