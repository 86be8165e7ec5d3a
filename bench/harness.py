"""What every benchmark script shares: the two flags the interface promises (`--quick`,
`--json FILE`), how a result is reported, and the environment of the processes it starts."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser that already has `--quick` and `--json FILE`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser


def report(
    result: dict[str, Any], print_table: Callable[[dict[str, Any]], None], path: Path | None
) -> None:
    """Print the readable table, then write the figures as one JSON object if asked."""
    print_table(result)
    if path is not None:
        path.write_text(json.dumps(result, indent=2) + "\n")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child that imports this checkout's code (a trainer,
    the service, `bench.api`), plus `extra`."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}
