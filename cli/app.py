"""The `bso-cache` command line: options -> frozen configs -> library calls. No math, no I/O logic.

Every error a user can cause prints as one line, `error: ...`, and exits 2: the project's own
errors (bad input, bad options, damaged caches) and the parser's (an unknown option, a value that
is not one of an option's choices). Anything else is a bug and keeps its traceback.

The commands live in cache_cmds.py (build, inspect, verify), train_cmds.py (train, sweep) and
more_cmds.py (eval, report, plan, demo); their options are tables (options.py).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable

import typer
from typer.core import TyperGroup

try:  # Typer vendors click (typer._click) since 0.2x; its exceptions are not the installed click's
    from typer._click import exceptions as click
except ImportError:  # pragma: no cover - an older Typer on click itself
    from click import exceptions as click


class _OneLineErrors(TyperGroup):
    """The parser's usage errors as one `error:` line (exit 2), like the project's own errors."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.NoArgsIsHelpError as e:  # `bso-cache` alone: the help
            if not standalone_mode:
                raise
            typer.echo(e.format_message())
            sys.exit(e.exit_code)
        except click.ClickException as e:
            if not standalone_mode:
                raise
            where = e.ctx.command_path if isinstance(e, click.UsageError) and e.ctx else "bso-cache"
            message = e.format_message().replace("Value error, ", "").rstrip(".")
            typer.echo(f"error: {where}: {message}; see `{where} --help`", err=True)
            sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
        except click.Abort:
            if not standalone_mode:
                raise
            typer.echo("interrupted", err=True)
            sys.exit(130)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


app = typer.Typer(
    name="bso-cache",
    cls=_OneLineErrors,
    help="Train LMs to be helpful and safe with BSO (DPO, SafeDPO, ...) from an offline "
         "reference-log-prob cache: `build` scores the data with the reference once, `train` "
         "trains the policy alone, as often as you like.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def run(fn: Callable, *args, **kwargs):
    """Call the library; its errors (BsoCacheError) become one `error:` line and exit 2."""
    from bso_cache.errors import BsoCacheError

    try:
        return fn(*args, **kwargs)
    except BsoCacheError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def use_recipe(ctx: typer.Context, param, value):
    from .recipes import use_recipe as read

    return read(ctx, param, value)


def log(line: str) -> None:
    """A progress line on stderr, written above any progress bar instead of through it."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def echo_json(obj, indent: int | None = 2) -> None:
    """Strict JSON on stdout: null where a figure does not exist, never NaN."""
    from bso_cache.files import strict_json

    typer.echo(json.dumps(strict_json(obj), indent=indent, default=str, allow_nan=False))


def _version(value: bool) -> None:
    if value:
        from bso_cache import __version__

        typer.echo(f"bso-cache {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Train LMs to be helpful and safe with BSO (DPO, SafeDPO, ...) from an offline reference-log-prob
    cache: `build` scores the data with the reference once, `train` trains the policy alone, as often
    as you like."""


def main() -> None:
    import logging

    from bso_cache.allocator import return_freed_memory

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return_freed_memory()  # large freed blocks go back to the OS (bso_cache/allocator.py)
    # torchao (the adamw4bit extra; transformers imports it when installed) logs at import that its
    # CUDA-only kernels did not load, and torch that torchao registers an enum: nothing to act on
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    app()


from . import cache_cmds, train_cmds, more_cmds  # noqa: E402,F401,I001 - the commands register themselves, in this order

if __name__ == "__main__":
    main()
