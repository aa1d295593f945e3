"""The options of the commands beyond a training config, declared once for the Python API and `sdft`.

Each command's settings are a frozen dataclass next to the code that runs them (e.g.
`selfdistill.eval.settings.EvalSettings`). Every field is declared with `setting(default, help)`:
the help text documents the field for the API and is the option's `--help` text, and the default
is the API's and the option's. The settings check their values when built (`__post_init__`), with
the checks below, so a bad value gives the same UserError, naming the option, from the API and
from the command line. Settings that are training-config values are checked by the Config itself.

Every setting's value is checked against its declared type by one function, `coerce`, for the
training config (`selfdistill.config`) and for the commands' settings (`check_types`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
from pathlib import Path, PurePath
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from selfdistill.errors import UserError

SET_HELP = (
    "Override a setting: section.key=value (repeatable). Text settings take the value as typed; others read "
    "it as YAML: 1e-4, true, null, [a, b], {key: value}."
)


def setting(default: Any = dataclasses.MISSING, help: str = "", label: str | None = None) -> Any:
    """A dataclass field with its help text (its documentation and its `--help`) and, optionally, the few
    words a model card names it by (`label`); no default makes it required. A list or dict default is
    copied for every instance; frozen settings use tuples."""
    metadata = {"help": help} if label is None else {"help": help, "label": label}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


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


def choices(kind: Any) -> tuple[str, ...]:
    """The allowed values of a multiple-choice setting type, e.g. choices(LossKind): a Literal's
    values, or those of a type that reads them when asked (MethodName: the registered methods); for a
    choice that may also be None (unset), the choices it may be set to."""
    kind = _without_none(kind)
    dynamic = getattr(kind, "choices", None)
    return tuple(dynamic()) if callable(dynamic) else tuple(get_args(kind))


def is_choice(kind: Any) -> bool:
    kind = _without_none(kind)
    return get_origin(kind) is Literal or callable(getattr(kind, "choices", None))


def is_text(kind: Any) -> bool:
    """Whether a setting of type `kind` holds text: a str, a path or a choice of strings (or one of them or None)."""
    kind = _without_none(kind)
    if is_choice(kind):
        return all(isinstance(c, str) for c in choices(kind))
    return kind is str or (isinstance(kind, type) and issubclass(kind, PurePath))


def _without_none(kind: Any) -> Any:
    """X for `X | None` (kinds with several other members, and all others, unchanged)."""
    if get_origin(kind) in (Union, types.UnionType):
        members = [a for a in get_args(kind) if a is not type(None)]
        return members[0] if len(members) == 1 else kind
    return kind


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _expected(kind: Any) -> str:
    if dataclasses.is_dataclass(kind):
        return "a section (mapping)"
    if kind in (list, tuple) or get_origin(kind) in (list, tuple):
        return "a list"
    if kind is dict or get_origin(kind) is dict:
        return "a mapping"
    if isinstance(kind, type) and issubclass(kind, PurePath):
        return "a path"
    return getattr(kind, "__name__", str(kind))


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return f"a mapping ({value!r})"
    if isinstance(value, (list, tuple)):
        return f"a list ({value!r})"
    return repr(value)


def _mismatch(value: Any, kind: Any, where: str) -> UserError:
    # A number or a mapping where text belongs mostly comes from YAML, which reads `2023` or `a: b` as such.
    hint = " (in a YAML file, put text in quotes)" if kind is str else ""
    return UserError(f"{where}: expected {_expected(kind)}, got {_shown(value)}{hint}.")


def coerce(value: Any, kind: Any, where: str, noun: str = "value") -> Any:
    """`value` as a setting of the declared type `kind`, or a UserError that starts with `where` (the
    setting, e.g. "Config value train.lr") and names what was expected; `noun` names a choice's kind in
    "unknown loss kind 'kl'".

    Checked: str, int, float, bool, paths, Literal (and other multiple-choice) types, list[X],
    tuple[X, ...], dict and dict[str, X], X | None, settings sections (dataclasses), and Any (anything).
    Lenient only where the reading is unambiguous, since YAML and the command line give text: numbers
    and true/false written as text ('1e-4', which PyYAML reads as a string, is a float), an int where a
    float belongs, 0 or 1 for a bool, a comma-separated string for a list, one string for a tuple, a
    path for a str. Strict otherwise: True is not an int (bool is a subclass of int in Python), 42 is
    not text and a mapping is not text.
    """
    if kind is Any:
        return value
    if get_origin(kind) in (Union, types.UnionType):
        if value is None and type(None) in get_args(kind):
            return None
        members = [a for a in get_args(kind) if a is not type(None)]
        for member in members[:-1]:
            try:
                return coerce(value, member, where, noun)
            except UserError:
                pass  # the next member may fit; the last one's error is the message
        return coerce(value, members[-1], where, noun)
    if is_choice(kind):
        return _choice(value, kind, where, noun)
    if value is None:
        raise UserError(f"{where}: may not be null.")
    origin, args = get_origin(kind), get_args(kind)
    if kind in (list, tuple) or origin in (list, tuple):
        as_list = kind is list or origin is list
        if isinstance(value, str):  # a list: comma-separated on the command line; a tuple: one value
            value = [v.strip() for v in value.split(",") if v.strip()] if as_list else [value]
        if not isinstance(value, (list, tuple)):
            raise _mismatch(value, kind, where)
        items = [coerce(item, args[0], where, noun) for item in value] if args else list(value)
        return items if as_list else tuple(items)
    if kind is dict or origin is dict:
        return _mapping(value, kind, where, noun)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, kind):
            raise _mismatch(value, kind, where)
        return value
    try:
        return _scalar(value, kind)
    except (TypeError, ValueError):
        raise _mismatch(value, kind, where) from None


def _choice(value: Any, kind: Any, where: str, noun: str) -> Any:
    allowed = choices(kind)
    if isinstance(value, bool):  # YAML reads unquoted off/on/no/yes as booleans
        spelled = [a for a in allowed if str(a).lower() in (_TRUE if value else _FALSE)]
        value = spelled[0] if len(spelled) == 1 else value
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{where}: unknown {noun} {value!r}; choose one of {', '.join(map(str, allowed))}.{hint}")
    return value


def _mapping(value: Any, kind: Any, where: str, noun: str) -> dict:
    if isinstance(value, str):  # a mapping written as YAML text, e.g. "{prompt: instruction}"
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"{where}: expected a mapping such as {{key: value}}, got {value!r}.") from None
    if not isinstance(value, dict):
        raise _mismatch(value, kind, where)
    args = get_args(kind)
    if len(args) == 2:
        return {coerce(k, args[0], where, noun): coerce(v, args[1], f"{where}.{k}", noun) for k, v in value.items()}
    return value


def _scalar(value: Any, kind: Any) -> Any:
    """`value` as the plain type `kind`; ValueError where it is not one."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
    elif isinstance(kind, type) and issubclass(kind, PurePath):
        if isinstance(value, (str, os.PathLike)):
            return kind(value)
    elif isinstance(kind, type):
        if isinstance(value, kind):
            return value
    else:
        return value  # a kind of annotation this check does not know: left to the setting's own checks
    raise ValueError(value)


def check_types(settings: Any) -> None:
    """Check every field of the frozen command settings `settings` against its declared type, as `coerce`
    does (storing what it converts, e.g. a str given for a Path); a wrong type names the option."""
    hints = get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        option = "--" + f.name.replace("_", "-")
        object.__setattr__(settings, f.name, coerce(getattr(settings, f.name), hints[f.name], option, option))
