"""Command-line options derived from the configurations' field metadata (bso_cache/config/fields.py):
each option's type, default, help and spellings are its field's; choices are the field's Literal
type, so `--help` shows them and a wrong value is refused by the parser, naming the option.

`with_options` gives a command function `fn(**options)` the parameters Typer reads; the function's
body turns them into its configuration and calls the library once.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import typer

from bso_cache.config import OptionInfo, options as config_options

RECIPE_HELP = ("A recipe file (YAML, TOML or JSON; a run's run_config.json too): keys are this command's option "
               "names, flags given here override it.")


def _plain(hint):
    """`X | None` as typing.Optional[X] (the form Typer reads); other hints as they are."""
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:
        return Optional[next(a for a in args if a is not type(None))]
    return hint


def _annotation(o: OptionInfo, optional: bool = False):
    if o.meta.get("path"):
        return Optional[Path] if optional or o.optional or o.default is None else Path
    hint = _plain(o.hint)
    return Optional[hint] if optional and not o.optional else hint


def _flag(o: OptionInfo, default) -> str:
    if o.meta.get("flag"):
        return o.meta["flag"]
    name = o.name.replace("_", "-")
    return f"--{name}/--no-{name}" if default is True or (default is None and o.hint is bool) else f"--{name}"


def parameter(o: OptionInfo, *, default: Any = MISSING, annotation=None, help: str | None = None,
              aliases: Iterable[str] = ()) -> inspect.Parameter:
    """The Typer parameter of one option (its field's default, type and help unless given)."""
    default = o.default if default is MISSING else default
    decls = [_flag(o, default)] + ([o.meta["short"]] if o.meta.get("short") else []) + list(aliases)
    return inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY,
                             annotation=annotation if annotation is not None else _annotation(o),
                             default=typer.Option(... if default is MISSING else default, *decls,
                                                  help=o.meta.get("help") if help is None else help))


def config_parameters(cls, *, only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                      aliases: dict[str, tuple[str, ...]] | None = None) -> list[inspect.Parameter]:
    """The parameters of a configuration's command-line options, in the configuration's order."""
    keep = set(only) if only is not None else None
    return [parameter(o, aliases=(aliases or {}).get(o.name, ())) for o in config_options(cls)
            if o.meta.get("cli", True) and o.name not in exclude and (keep is None or o.name in keep)]


def forwarded_parameters(cls, exclude: Iterable[str] = ()) -> list[inspect.Parameter]:
    """Options passed through as they are, unset (None) unless given: a sweep's train options."""
    return [parameter(o, default=None, annotation=_annotation(o, optional=True)) for o in config_options(cls)
            if o.meta.get("cli", True) and o.name not in exclude]


def grid_parameters(cls, names: Iterable[str]) -> list[inspect.Parameter]:
    """One comma-separated grid option per name (a sweep's sweepable train options)."""
    params = []
    for o in config_options(cls):
        if o.name not in names:
            continue
        what = (f" ({', '.join(map(str, o.choices))})" if o.choices
                else " (none: the default)" if o.optional else "")
        params.append(parameter(o, default=None, annotation=Optional[str],
                                help=f"Grid of train's {o.flag_name}: comma-separated values{what}."))
    return params


def recipe_parameter(callback: Callable, help: str = RECIPE_HELP) -> inspect.Parameter:
    return inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                             default=typer.Option(None, "--config", help=help, is_eager=True, callback=callback))


def with_options(*groups: list[inspect.Parameter], context: bool = False) -> Callable:
    """Give the decorated `fn(**options)` (or `fn(ctx, **options)`) these parameters."""
    def decorate(fn):
        params = [p for group in groups for p in group]
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
