"""Flat config dataclasses <-> command line flags and TOML files.

Every entry point (`grpo.train`, `sft.train`, `eval.run`) has one flat dataclass.  Each field
becomes a `--flag` (underscores written as dashes), its help text comes from the field's
`metadata["help"]`, and `--config FILE.toml` loads many fields at once.  Precedence: the
dataclass defaults, then the TOML file, then flags given on the command line.  An unknown key
(in the file or on the command line) is refused with the nearest valid name.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar



def toml_parser() -> types.ModuleType | None:
    """tomllib (Python >= 3.11), else the same parser from PyPI, tomli (a dependency on 3.10)."""
    for name in ("tomllib", "tomli"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


tomllib = toml_parser()

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad flag, a bad TOML key or a bad value; the message says which and what would be valid."""


def field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help text (shown by --help together with its default)."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _field_type(cls: type, name: str) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of a field annotated like `int | None`."""
    return _base_type(typing.get_type_hints(cls)[name])


def _base_type(annotation: Any) -> tuple[type, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _parse_value(raw: str, kind: type, optional: bool, name: str) -> Any:
    if optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise ConfigError(f"--{name.replace('_', '-')}: cannot read {raw!r} as {kind.__name__}") from None


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_value(cls: type, cls_fields: dict[str, dataclasses.Field], name: str, value: Any) -> Any:
    kind, optional = _field_type(cls, name)
    if value is None:
        if not optional:
            raise ConfigError(f"{name}: None is not allowed")
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")
    choices = cls_fields[name].metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {list(choices)}")
    return value


def check_ranges(config: Any, *, at_least_one: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 positive: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming the flag of the first field outside its range.

    Config dataclasses call this from `__post_init__`, so a bad value fails at once with the flag's
    name (`parse_config` prints it as a usage error) instead of deep inside the training loop.
    None (an unset optional field) is always accepted.
    """
    for names, bad, wanted in ((at_least_one, lambda v: v < 1, ">= 1"), (non_negative, lambda v: v < 0, ">= 0"),
                               (positive, lambda v: not v > 0, "> 0")):
        for name in names:
            value = getattr(config, name)
            if value is not None and bad(value):
                raise ValueError(f"--{name.replace('_', '-')} must be {wanted}, got {value}")


def load_toml(cls: type[T], path: str | Path) -> dict[str, Any]:
    """The fields set in a TOML file (top-level keys; dashes or underscores), checked against `cls`."""
    if tomllib is None:
        raise ConfigError("--config needs a TOML parser: Python >= 3.11 (tomllib) or `pip install tomli`")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    with path.open("rb") as handle:
        try:
            raw = tomllib.load(handle)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"--config {path}: not valid TOML: {error}") from None
    cls_fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in cls_fields:
            raise ConfigError(f"{path}: unknown config key {key!r}{_suggest(name, list(cls_fields))}")
        values[name] = _check_value(cls, cls_fields, name, value)
    return values


class _Parser(argparse.ArgumentParser):
    """argparse that suggests the nearest flag for an unknown one."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        if "unrecognized arguments" in message:
            valid = [opt for action in self._actions for opt in action.option_strings]
            bad = message.split(":", 1)[1].split()
            hints = [f"{flag}{_suggest(flag.split('=')[0], valid)}" for flag in bad if flag.startswith("-")]
            if hints:
                message = "unrecognized arguments: " + ", ".join(hints)
        super().error(message)


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    parser = _Parser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="FILE.toml", help="load fields from a TOML file (flags given here win)")
    for f in dataclasses.fields(cls):
        kind, optional = _field_type(cls, f.name)
        flag = "--" + f.name.replace("_", "-")
        choices = f.metadata.get("choices")
        one_of = f"; one of {', '.join(map(str, choices))}" if choices else ""
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r}{one_of})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(
                flag, dest=f.name, default=None, metavar=kind.__name__.upper(),
                choices=f.metadata.get("choices"), type=str if f.metadata.get("choices") is None else kind,
                help=help_text,
            )
    return parser


def parse_config(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """Defaults < --config TOML < command-line flags.  Exits with a clear message on bad input."""
    parser = build_parser(cls, description)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        values: dict[str, Any] = load_toml(cls, args.config) if args.config else {}
        cls_fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in cls_fields.items():
            raw = getattr(args, name)
            if raw is None:
                continue
            if isinstance(raw, str):
                kind, optional = _field_type(cls, name)
                raw = _parse_value(raw, kind, optional, name)
            values[name] = raw
        return cls(**values)
    except (ConfigError, ValueError) as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(cls: type[T], values: dict[str, Any], *, strict: bool = False) -> T:
    """Rebuild a config from a saved dict.  Unknown keys are refused when strict, else dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown and strict:
        raise ConfigError(f"unknown config keys {unknown}{_suggest(unknown[0], sorted(names))}")
    return cls(**{k: v for k, v in values.items() if k in names})


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n")
