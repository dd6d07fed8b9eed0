"""`accelserve models --supported`: the architecture support table, computed from the installed libraries."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def supported_table() -> Table:
    """One row per model_type Optimum exports for text generation (plugin.convert.architectures)."""
    from plugin.convert.architectures import support_table

    table = Table(title="Architectures (Optimum text-generation-with-past; fused = onnxruntime-genai builder)")
    for column in ("architecture", "graph", "precisions", "targets", "status", "reason"):
        table.add_column(column, overflow="fold")
    for row in support_table():
        table.add_row(
            row.model_type, row.graph, ",".join(row.precisions), ",".join(row.targets), row.status, row.reason or ""
        )
    table.caption = "--json adds npu_reason: why the QNN HTP pipeline does not take an architecture"
    return table


def cmd_models(args: argparse.Namespace) -> int:
    if not args.supported:
        console.print("accelserve models --supported [--json]: the architectures export() serves, and why not others")
        return 2
    from plugin.convert.architectures import support_table

    if args.json:
        rows: list[dict[str, Any]] = [row.to_dict() for row in support_table()]
        print(json.dumps(rows, indent=2))
    else:
        console.print(supported_table())
    return 0


def add_parser(sub: Any) -> None:
    """Register `models` on the accelserve subparsers."""
    p = sub.add_parser("models", help="model architectures: `--supported` prints what can be exported and served")
    p.add_argument("--supported", action="store_true", help="the architecture table: graph, precisions, targets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
