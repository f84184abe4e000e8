"""Recipe files: `--config FILE` (YAML, TOML or JSON) on build, train and sweep.

Keys are the command's option names (`lr`, `safety-penalty` or `safety_penalty`); the file's
values become the options' defaults, so flags given on the command line override it. A run's
`run_config.json` is itself a recipe (its `config` section). Unknown keys and values of the
wrong type are refused in one line naming the key and the file. A sweep's recipe may also hold
any `train` option, passed to every run like its extra flags.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _fail(message: str):
    from bso_cache.errors import ConfigError

    raise ConfigError(message)


def read_recipe(path: Path) -> dict:
    """The mapping in a YAML / TOML / JSON file (a run_config.json: its `config` section)."""
    try:
        text = path.read_text()
    except OSError as e:
        _fail(f"--config {path}: cannot be read ({e.strerror or e})")
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parser's error: one line naming the file
        _fail(f"--config {path}: not a valid {path.suffix.lstrip('.').upper() or 'YAML'} file ({str(e).splitlines()[0]})")
    if not isinstance(data, dict):
        _fail(f"--config {path}: holds no mapping of option names to values")
    if isinstance(data.get("config"), dict) and "loss" in data:  # a run's run_config.json
        data = data["config"]
    return data


def _cast(ctx: typer.Context, param, key: str, value, path: Path):
    """The value as the option's type converts it (the same checks as on the command line)."""
    if value is None:
        return None
    try:
        return param.process_value(ctx, value)
    except Exception as e:  # noqa: BLE001 - the CLI library's BadParameter: one line
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        _fail(f"--config {path}: key '{key}': {message}")


def _dataclass_defaults(command_name: str) -> dict:
    """Fields a run_config.json holds that have no option (left at their defaults)."""
    import dataclasses

    from bso_cache.config import BuildConfig, TrainConfig, options

    cls = BuildConfig if command_name == "build" else TrainConfig
    return {o.name: o.default for o in options(cls) if o.default is not dataclasses.MISSING}


def use_recipe(ctx: typer.Context, param, value):
    """Eager callback of `--config`: the file's values become the command's defaults."""
    if value is None:
        return value
    path = Path(value)
    data = read_recipe(path)
    params = {p.name: p for p in ctx.command.params if p.name != "config"}
    defaults = {}
    hidden = _dataclass_defaults(ctx.command.name)
    for key, raw in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in params:
            defaults[name] = _cast(ctx, params[name], key, raw, path)
        elif name in hidden and raw == hidden[name]:
            continue  # a field of a saved run_config.json that no option sets
        else:
            _fail(f"--config {path}: unknown key '{key}' for `bso-cache {ctx.command.name}`; the keys are its "
                  f"option names (see `bso-cache {ctx.command.name} --help`)")
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value
