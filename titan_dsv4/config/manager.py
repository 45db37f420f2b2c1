"""Load a JobConfig: defaults < TOML file < ``--section.key value`` command-line overrides.

Every problem raises :class:`ConfigError` with one line naming the key, the value and what is allowed;
the trainer turns it into an exit code of 2 before any process group or model exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any

from .job_config import JobConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad configuration value; the message is the whole user-facing explanation."""


def _sections() -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else typing.get_type_hints(JobConfig)[f.name]
            for f in dataclasses.fields(JobConfig)}


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean `{match[0]}`?)" if match else ""


def _convert(key: str, value: Any, hint: Any, from_cli: bool) -> Any:
    """Coerce ``value`` to the annotated type ``hint`` or raise ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if value is None or (from_cli and str(value).lower() in ("none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if from_cli and hint is not str and isinstance(value, str):
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            if hint is bool or (origin is list and args[0] is not str):
                raise ConfigError(f"`{key}` = {value!r} is invalid: expected {_describe(hint)}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, str) and args[0] is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [_convert(key, v, args[0], from_cli=False) for v in value]
    raise ConfigError(f"`{key}` = {value!r} is invalid: expected {_describe(hint)}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list ({_describe(typing.get_args(hint)[0])} each)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _set(config: JobConfig, dotted: str, value: Any, from_cli: bool) -> None:
    sections = _sections()
    if "." not in dotted:
        raise ConfigError(f"`{dotted}` is not a config key: use --section.key (sections: {', '.join(sections)})")
    section_name, key = dotted.split(".", 1)
    if section_name not in sections:
        raise ConfigError(f"unknown config section `{section_name}`{_closest(section_name, list(sections))}; "
                          f"allowed: {', '.join(sections)}")
    section = getattr(config, section_name)
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise ConfigError(f"unknown config key `{dotted}`{_closest(key, list(hints))}; "
                          f"keys of [{section_name}]: {', '.join(hints)}")
    setattr(section, key, _convert(dotted, value, hints[key], from_cli))


def load_config(argv: list[str] | None = None) -> JobConfig:
    """Parse the command line (and the TOML file it names) into a JobConfig; no validation of meaning."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key value")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = body, argv[i + 1]
            i += 2
        else:
            key, value = body, "true"  # bare flag: a boolean switched on
            i += 1
        overrides.append((key.replace("-", "_"), value))

    config = JobConfig()
    config_file = next((v for k, v in reversed(overrides) if k == "job.config_file"), None)
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"`job.config_file` = {config_file!r} is invalid: no such file")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"`job.config_file` = {config_file!r} is not valid TOML: {e}") from None
        for section_name, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"top-level key `{section_name}` in {config_file} must be a [section]")
            for key, value in table.items():
                _set(config, f"{section_name}.{key}", value, from_cli=False)
    for key, value in overrides:
        _set(config, key, value, from_cli=True)
    return config


def config_to_dict(config: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
