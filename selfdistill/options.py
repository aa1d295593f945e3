"""The options of the commands beyond a training config, declared once for the Python API and `sdft`.

Each command's settings are a frozen dataclass next to the code that runs them (e.g.
`selfdistill.eval.settings.EvalSettings`). Every field is declared with `setting(default, help)`:
the help text documents the field for the API and is the option's `--help` text, and the default
is the API's and the option's. The settings check their values when built (`__post_init__`), with
the checks below, so a bad value gives the same UserError, naming the option, from the API and
from the command line. Settings that are training-config values are checked by the Config itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from selfdistill.errors import UserError


def setting(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A dataclass field with its help text (its documentation and its `--help`); no default makes it
    required. A list or dict default is copied for every instance; frozen settings use tuples."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _field(cls: type, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(cls)}[name]


def help_of(cls: type, name: str) -> str:
    """The help text of the field `name` of the settings class `cls`."""
    return _field(cls, name).metadata.get("help", "")


def cli_option(cls: type, name: str, *flags: str, **extra: Any) -> Any:
    """The typer option of the field `name` of `cls`: its default (required without one) and its help.

    For the command-line modules, so that an option's default and help are the settings' own."""
    import typer  # the command line's library, loaded only by the command line

    default = _field(cls, name).default
    if default is dataclasses.MISSING:
        default = ...  # typer's mark of a required option
    elif isinstance(default, tuple):  # a repeatable option: typer collects its values in a list
        default = list(default)
    return typer.Option(default, *flags, help=help_of(cls, name) or None, **extra)


def as_tuples(settings: Any, *names: str) -> None:
    """Store the fields `names` of frozen `settings` as tuples: the command line collects a repeated option
    in a list, and an API caller may give one value as a string."""
    for name in names:
        value = getattr(settings, name)
        object.__setattr__(settings, name, (value,) if isinstance(value, str) else tuple(value))


def given_options(cls: type, caller: str, options: dict, exclude: set[str] = frozenset()) -> None:
    """Reject a keyword that is not a field of `cls` (or one of `exclude`, which `caller` takes itself)."""
    valid = [f.name for f in dataclasses.fields(cls) if f.name not in exclude]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(f"{caller}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}.")


def check_at_least(option: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UserError(f"{option} must be at least {minimum}, got {value}.")


def check_choice(option: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(f"{option} must be one of {', '.join(map(str, allowed))}, got {value!r}.")


def check_output_dir(option: str, path: Path) -> None:
    """An output directory may exist (it is added to) but may not be a file."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: exists and is not a directory.")
