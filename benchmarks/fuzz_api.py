"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis + hypothesis).

Every operation the server documents gets generated requests, valid (positive) and schema-violating
(negative), sent over one keep-alive session. It counts statuses and fails on what must never happen: a
server error other than the documented 503, a reset connection, or a device left unhealthy.

    python benchmarks/fuzz_api.py --url http://127.0.0.1:8000 --examples 500
    python benchmarks/fuzz_api.py --model default --examples 500   # starts its own server

The fast test suite runs the same function with a few examples per operation on a fake backend.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("fuzz_api")

ALLOWED_5XX = {503}  # no device available / shutting down: documented, retryable


@dataclass
class FuzzReport:
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    server_errors: list[str] = field(default_factory=list)  # 5xx other than 503, with the request that caused it
    connection_errors: list[str] = field(default_factory=list)
    unhealthy_after: bool = False
    operations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.server_errors and not self.connection_errors and not self.unhealthy_after


def fuzz(url: str, examples: int, headers: dict[str, str] | None = None, seed: int = 0) -> FuzzReport:
    """Fuzz every documented operation of the server at `url` with `examples` generated requests per mode."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=dict(headers or {}))
    report = FuzzReport(operations=sorted(op.ok().label for op in schema.get_all_operations()))
    counts: Counter[str] = Counter()
    session = requests.Session()  # one keep-alive connection: a reset would show up as an error
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    strategy = st.one_of([schema.as_strategy(generation_mode=m) for m in modes])

    served = requests.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy, aim=st.booleans())
    def one(case: Any, aim: bool) -> None:
        if aim and isinstance(case.body, dict):  # half the bodies name a served model, so generation runs too
            case.body["model"] = served
            for key in ("max_tokens", "max_completion_tokens"):  # short replies keep a CPU run practical
                value = case.body.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 8:
                    case.body[key] = 8
            case.body.setdefault("max_tokens", 8)
        report.requests += 1
        try:
            response = case.call(base_url=url, session=session, headers=headers, timeout=120)
        except requests.RequestException as e:
            report.connection_errors.append(f"{case.operation.label}: {type(e).__name__}: {e}")
            return
        counts[str(response.status_code)] += 1
        if response.status_code >= 500 and response.status_code not in ALLOWED_5XX:
            body = response.text[:300]
            report.server_errors.append(f"{case.operation.label} {case.body!r:.200} -> {response.status_code} {body}")

    one()
    report.statuses = dict(sorted(counts.items()))
    health = requests.get(f"{url}/health", timeout=30).json()
    report.unhealthy_after = not health.get("ok", False)
    return report


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_serving import running_server  # starts `accelserve`'s app in its own process
    from benchmarks.common import RESULTS_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="fuzz a running server (otherwise one is started for --model)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--examples", type=int, default=500, help="generated requests per generation mode")
    parser.add_argument("--api-key")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "fuzz_api.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else None
    if args.url:
        report = fuzz(args.url, args.examples, headers)
    else:
        with running_server(args.model, "auto", "auto", args.out.with_suffix(".server.log")) as url:
            report = fuzz(url, args.examples, headers)
    print(f"{report.requests} generated requests over {len(report.operations)} operations")
    print("statuses: " + ", ".join(f"{k}: {v}" for k, v in report.statuses.items()))
    print(f"server errors (5xx other than 503): {len(report.server_errors)}")
    print(f"connection errors: {len(report.connection_errors)}; device healthy after: {not report.unhealthy_after}")
    for line in report.server_errors[:10] + report.connection_errors[:10]:
        print("  " + line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(asdict(report), indent=2))
    print(f"wrote {args.out}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
