"""`accelserve finetune MODEL --data FILE.jsonl --output DIR`: the command's arguments and its run."""

from __future__ import annotations

import argparse
import json
from typing import Any

from plugin.finetune.placement import DEVICE_CHOICES
from plugin.finetune.trainer import LoraSettings


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the subcommand on the `accelserve` parser's subparsers."""
    d = LoraSettings()
    p = sub.add_parser("finetune", help="LoRA fine-tune on chat data (.jsonl) into a merged HF checkpoint folder")
    p.add_argument("model", help="'default', an HF checkpoint folder, a .gguf file or a cached hub id")
    p.add_argument("--data", required=True, help='.jsonl, one {"messages": [...]} chat per line (OpenAI format)')
    p.add_argument("--output", required=True, help="folder for the merged checkpoint, model card and loss curve")
    p.add_argument("--eval-data", help="held-out .jsonl (default: hold out --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    p.add_argument("--alpha", type=int, default=d.alpha, help="LoRA alpha (scale alpha/rank)")
    p.add_argument("--max-length", type=int, help="tokens per conversation (default: the context, at most 1024)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: a real GPU (bf16), else the CPU")
    p.add_argument("--threads", type=int, help="torch CPU threads while training (default: torch's)")
    p.add_argument("--force", action="store_true", help="replace an earlier fine-tune in --output")
    p.add_argument("--json", action="store_true", help="print the record (finetune.json) instead of a summary")
    p.set_defaults(func=cmd_finetune)
    return p


def cmd_finetune(args: argparse.Namespace) -> int:
    from rich.console import Console

    from plugin.finetune.run import finetune

    settings = LoraSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        rank=args.rank,
        alpha=args.alpha,
        max_length=args.max_length,
        seed=args.seed,
    )
    result = finetune(
        args.model,
        args.data,
        args.output,
        eval_data=args.eval_data,
        eval_fraction=args.eval_fraction,
        settings=settings,
        device=args.device,
        overwrite=args.force,
        threads=args.threads,
    )
    r = result.record
    if args.json:
        print(json.dumps({"path": str(result.path), **r.to_dict()}, indent=2))
        return 0
    console = Console()
    console.print(f"[green]fine-tuned[/] {r.base_model_name} -> {result.path}")
    console.print(f"trained on {result.placement.device_id} ({result.placement.dtype}): {result.placement.reason}")
    console.print(f"{r.steps} steps in {r.seconds:.1f} s, {r.tokens_per_s:.0f} tok/s")
    before = "n/a" if r.eval_loss_before is None else f"{r.eval_loss_before:.4f}"
    after = "n/a" if r.eval_loss_after is None else f"{r.eval_loss_after:.4f}"
    console.print(f"held-out loss {before} -> {after} ({r.eval_examples} conversations)")
    console.print(f"next: accelserve export {result.path} --target cpu   |   accelserve chat --model {result.path}")
    return 0
