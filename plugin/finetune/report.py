"""What a fine-tuned folder says about itself: `finetune.json` (machine-readable), a model card (`README.md`,
Hugging Face's format) and the loss curve (`loss_curve.png`, when matplotlib is installed: the `bench` extra).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RECORD_FILE = "finetune.json"
CARD_FILE = "README.md"
CURVE_FILE = "loss_curve.png"


@dataclass(frozen=True)
class FinetuneRecord:
    """Everything the card states: where the weights came from, on what data, how, and how well."""

    base_model: str  # what the user passed ("default", a folder, ...)
    base_model_name: str
    base_path: str
    data_file: str
    data_sha256: str
    eval_source: str  # "held-out split of the data (10%)" or the eval file's name and hash
    train_examples: int
    eval_examples: int
    hyperparameters: dict[str, Any]
    placement: dict[str, str]
    steps: int
    seconds: float
    tokens: int
    tokens_per_s: float
    train_loss_first: float
    train_loss_last: float
    eval_loss_before: float | None
    eval_loss_after: float | None
    losses: list[float]
    loss_curve: str | None  # file name, or None with the reason in `notes`
    versions: dict[str, str]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_loss_curve(losses: list[float], eval_before: float | None, eval_after: float | None, out: Path) -> str | None:
    """Plot the per-step training loss (and held-out loss before/after); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed, so no %s (install the 'bench' extra to get it)", CURVE_FILE)
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, label="training loss (batch)")
    if eval_before is not None and eval_after is not None:
        ax.scatter([0, len(losses)], [eval_before, eval_after], color="C3", zorder=3, label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per learned token")
    ax.set_title("LoRA fine-tune")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / CURVE_FILE)
    plt.close(fig)
    return CURVE_FILE


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def model_card(r: FinetuneRecord) -> str:
    """README.md in the Hugging Face model-card format (YAML front matter, then prose and tables)."""
    hp = "\n".join(f"| {k} | {v} |" for k, v in r.hyperparameters.items())
    curve = f"![loss curve]({r.loss_curve})\n" if r.loss_curve else ""
    notes = "".join(f"- {n}\n" for n in r.notes)
    return f"""---
base_model: {r.base_model_name}
library_name: transformers
pipeline_tag: text-generation
tags: [accelserve, lora, peft, fine-tuned]
---
# {r.base_model_name}, fine-tuned with LoRA

LoRA adapters trained with peft on chat data and merged into the weights: this folder is an ordinary
Hugging Face checkpoint (`accelserve export <folder>`, `Engine.from_pretrained("<folder>")`).

- Base model: `{r.base_model}` ({r.base_model_name})
- Data: `{Path(r.data_file).name}`, sha256 `{r.data_sha256}`, {r.train_examples} training conversations
- Held-out: {r.eval_examples} conversation(s): {r.eval_source}
- Trained on: {r.placement["device_id"]}, {r.placement["dtype"]}. Why: {r.placement["reason"]}

## Results

| | value |
|---|---|
| held-out loss before | {_fmt(r.eval_loss_before)} |
| held-out loss after | {_fmt(r.eval_loss_after)} |
| training loss, first step / last step | {r.train_loss_first:.4f} / {r.train_loss_last:.4f} |
| steps | {r.steps} |
| time | {r.seconds:.1f} s |
| tokens processed | {r.tokens} ({r.tokens_per_s:.0f} tok/s) |

{curve}
## Hyper-parameters

| name | value |
|---|---|
{hp}

Only assistant turns are learned (the chat template's prompt tokens are masked).
{notes}"""


def write_report(record: FinetuneRecord, out: Path) -> None:
    (out / RECORD_FILE).write_text(json.dumps(record.to_dict(), indent=2), encoding="utf-8")
    (out / CARD_FILE).write_text(model_card(record), encoding="utf-8")
