"""Field metadata: each option of a configuration declares, once, beside its default, what every
consumer needs to know about it. The command line, the sweep's grid, the resume rules, the model
card and `plan` read these flags; nothing else lists option names.

    help     the option's --help text
    short    a second spelling ("-c", or an alias such as "--qlora")
    path     the command line reads it as a path (stored as a string)
    flag     its spelling on the command line when it is not --name (--name/--no-name for a True default)
    sweep    `bso-cache sweep` can take a grid of it
    resume   a resumed run may change it (it decides where and how the run reports, not what it computes)
    card     the model card's training table shows it
    plan     `bso-cache plan` reads it (the memory levers and the batch)
    cli      False: a field of the configuration that no option sets
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, Field, dataclass, field
from typing import Any, Iterator

from bso_cache.errors import ConfigError

_FLAGS = ("sweep", "resume", "card", "plan")


def option(default: Any = MISSING, help: str = "", *, short: str | None = None, path: bool = False,
           flag: str | None = None, sweep: bool = False, resume: bool = False, card: bool = False,
           plan: bool = False, cli: bool = True) -> Any:
    """A dataclass field with its metadata (see the module's docstring)."""
    meta = {"help": help, "short": short, "path": path, "flag": flag, "sweep": sweep, "resume": resume,
            "card": card, "plan": plan, "cli": cli}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionInfo:
    """One option as the consumers see it: its name, type hint, default (MISSING: required),
    section (None for a configuration without sections) and metadata."""

    name: str
    hint: Any
    default: Any
    section: str | None
    meta: dict

    @property
    def choices(self) -> tuple:
        return typing.get_args(self.hint) if typing.get_origin(self.hint) is typing.Literal else ()

    @property
    def optional(self) -> bool:
        return type(None) in typing.get_args(self.hint)

    @property
    def flag_name(self) -> str:
        return f"--{self.name.replace('_', '-')}"


def _fields_of(cls, section: str | None) -> Iterator[OptionInfo]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield OptionInfo(f.name, hints[f.name], _default(f), section, dict(f.metadata))


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def options(cls) -> list[OptionInfo]:
    """Every option of a configuration class, in order (a sectioned one: section by section)."""
    sections = getattr(cls, "SECTIONS", None)
    if sections is None:
        return list(_fields_of(cls, None))
    return [o for name, section_cls in sections.items() for o in _fields_of(section_cls, name)]


def names(cls, **flags: bool) -> tuple[str, ...]:
    """The option names whose metadata has every given flag: names(TrainConfig, sweep=True)."""
    unknown = set(flags) - set(_FLAGS) - {"cli"}
    if unknown:
        raise TypeError(f"unknown option flag(s) {sorted(unknown)}")
    return tuple(o.name for o in options(cls) if all(o.meta.get(k, False) == v for k, v in flags.items()))


def section_names(cls, section: str) -> tuple[str, ...]:
    return tuple(o.name for o in options(cls) if o.section == section)


def check_choices(cfg) -> None:
    """Every Literal-typed field holds one of its values (the CLI checks them too; the API does not)."""
    for o in options(type(cfg)):
        value = getattr(cfg, o.name)
        if o.choices and value not in o.choices and not (value is None and o.optional):
            raise ConfigError(f"unknown {o.flag_name} '{value}'; valid: {', '.join(map(str, o.choices))}")


def check_digest_text(value: str | None) -> None:
    import re

    if value is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
        raise ConfigError(f"--expect-digest {value}: a manifest digest is sha256: and 64 hex digits, as "
                          f"`bso-cache inspect` prints it")


def to_dict(cfg) -> dict:
    """A configuration as one flat mapping of option names to values (what run_config.json holds)."""
    return {o.name: getattr(cfg, o.name) for o in options(type(cfg))}
