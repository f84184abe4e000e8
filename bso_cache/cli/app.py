"""The `bso-cache` command line: options -> frozen configs -> one library call per command.

This module makes the app and registers the commands, which are plain functions in
cache_cmds.py (build, inspect, verify), train_cmds.py (train, sweep) and more_cmds.py (eval,
report, plan, demo); their options come from the configurations' metadata (options.py).

Errors are handled here, once. Every error a user can cause prints as one line, `error: ...`,
and exits 2: the project's own errors (bad input, bad options, damaged caches) and the parser's
(an unknown option, a value that is not one of an option's choices). Ctrl-C exits 130, a closed
pipe (`bso-cache inspect -c C | head -1`) quietly. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from bso_cache.errors import BsoCacheError

from bso_cache.cli.cache_cmds import build, inspect, verify
from bso_cache.cli.more_cmds import demo, eval_cmd, plan, report
from bso_cache.cli.train_cmds import sweep, train


class _OneLineErrors(TyperGroup):
    """The parser's and the library's errors as one `error:` line (through Typer's public API)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:  # click's usage errors (an unknown option, a bad value, ...)
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else "bso-cache"
            message = e.format_message().replace("Value error, ", "").rstrip(".")
            typer.echo(f"error: {where}: {message}; see `{where} --help`", err=True)
            sys.exit(e.exit_code)
        except BsoCacheError as e:
            typer.echo(f"error: {e}", err=True)
            sys.exit(getattr(e, "exit_code", 2))
        except (KeyboardInterrupt, typer.Abort):
            typer.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader went away (`| head`): nothing more to say, to anyone
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


HELP = ("Train LMs to be helpful and safe with BSO (DPO, SafeDPO, ...) from an offline reference-log-prob cache: "
        "`build` scores the data with the reference once, `train` trains the policy alone, as often as you like.")

app = typer.Typer(name="bso-cache", cls=_OneLineErrors, help=HELP, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None, invoke_without_command=True)


def _version(value: bool) -> None:
    if value:
        from bso_cache import __version__

        typer.echo(f"bso-cache {__version__}")
        raise typer.Exit()


@app.callback()
def _main(ctx: typer.Context,
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    if ctx.invoked_subcommand is None:  # `bso-cache` alone: the help
        typer.echo(ctx.get_help())


app.command()(build)
app.command()(inspect)
app.command()(verify)
app.command()(train)
app.command()(sweep)
app.command("eval")(eval_cmd)
app.command()(report)
app.command()(plan)
app.command()(demo)


def main() -> None:
    import logging

    from bso_cache.io.allocator import return_freed_memory

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return_freed_memory()  # large freed blocks go back to the OS (bso_cache/io/allocator.py)
    # torchao (the adamw4bit extra; transformers imports it when installed) logs at import that its
    # CUDA-only kernels did not load, and torch that torchao registers an enum: nothing to act on
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    app()


if __name__ == "__main__":
    main()
