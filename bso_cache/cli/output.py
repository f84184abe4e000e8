"""What the commands print: progress lines on stderr, results on stdout."""

from __future__ import annotations

import json
import sys

import typer


def log(line: str) -> None:
    """A progress line on stderr, written above any progress bar instead of through it."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def echo_json(obj, indent: int | None = 2) -> None:
    """Strict JSON on stdout: null where a figure does not exist, never NaN."""
    from bso_cache.io.files import strict_json

    typer.echo(json.dumps(strict_json(obj), indent=indent, default=str, allow_nan=False))
