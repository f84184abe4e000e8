"""Every command-line option, declared once, as a table: its help, its short flag, and where the
command has a config dataclass (build: BuildConfig, train: TrainConfig) its type and default come
from that field. Choices are the config's `Literal` types, so `--help` shows them and a wrong value
is refused by the parser, naming the option. `with_options` turns a table into the command's
signature for Typer; a command's body then takes `**options`.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer

_FIELD = object()  # the default (or type) of the config field of the same name


@dataclass(frozen=True)
class Opt:
    help: str
    short: str | None = None        # a second spelling: "-c", or an alias such as plan's "--qlora"
    type: Any = _FIELD              # the annotation
    default: Any = _FIELD           # ... for a required option
    flag: str | None = None         # the spelling when it is not --name (and --name/--no-name for a True default)
    extra: dict | None = None       # more typer.Option keywords (is_eager, callback, ...)


def _plain(hint):
    """`X | None` as typing.Optional[X] (the form Typer reads); other hints as they are."""
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:
        return Optional[next(a for a in args if a is not type(None))]
    return hint


def parameters(table: dict[str, Opt], config=None) -> list[inspect.Parameter]:
    """The Typer parameters of a table, in its order."""
    hints = typing.get_type_hints(config) if config else {}
    fields = {f.name: f for f in dataclasses.fields(config)} if config else {}
    params = []
    for name, o in table.items():
        kind = _plain(hints[name]) if o.type is _FIELD else o.type
        if o.default is not _FIELD:
            default = o.default
        else:
            f = fields[name]
            default = ... if f.default is dataclasses.MISSING else f.default
        flag = o.flag or (f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}" if default is True
                          else f"--{name.replace('_', '-')}")
        decls = [flag] + ([o.short] if o.short else [])
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                        default=typer.Option(default, *decls, help=o.help, **(o.extra or {}))))
    return params


def with_options(*tables: tuple[dict[str, Opt], Any], context: bool = False) -> Callable:
    """Give the decorated `fn(**options)` (or `fn(ctx, **options)`) the signature of its tables."""
    def decorate(fn):
        params = [p for table, config in tables for p in parameters(table, config)]
        if context:
            params.insert(0, inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                               annotation=typer.Context))
        fn.__signature__ = inspect.Signature(params)
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn
    return decorate


def as_config_values(options: dict) -> dict:
    """Paths as the strings the configs hold."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}


# ----------------------------------------------------------------------------- shared help texts
RECIPE_HELP = ("A recipe file (YAML, TOML or JSON; a run's run_config.json too): keys are this command's option "
               "names, flags given here override it.")
PREFIX_SHARING_HELP = ("Score each prompt once for both responses (one sequence prompt+chosen+rejected with a "
                       "block mask): auto (where the estimated cost for this model and data is lower, on the device "
                       "kinds measured: the CPU and CUDA) | on | off. The numbers are the same either way; a model "
                       "whose attention cannot take the mask falls back to off with one printed line.")
ATTN_HELP = ("transformers' attention: auto (the measured best per device: docs/PERFORMANCE.md) | sdpa | eager | "
             "flex_attention (prefix sharing with FlexAttention's block mask; training with it needs a GPU). A "
             "model without FlexAttention support uses sdpa, with one printed line.")
DEVICE_HELP = "auto | cpu | cuda[:N]."
REMOTE_CODE_HELP = "Allow the model's own code from its repository (off unless you trust it)."
CACHE_HELP = "Cache folder (from `bso-cache build`)."


def recipe(callback: Callable, help: str = RECIPE_HELP) -> dict[str, Opt]:
    return {"config": Opt(help, type=Optional[Path], default=None,
                          extra={"is_eager": True, "callback": callback})}
