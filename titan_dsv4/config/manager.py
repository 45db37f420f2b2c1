"""Load a JobConfig: defaults < TOML file < ``--section.key value`` command-line overrides.

Every problem raises :class:`ConfigError` with one line naming the key, the value and what is allowed;
the trainer turns it into an exit code of 2 before any process group or model exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import sys
import textwrap
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .job_config import JobConfig
from .torchtitan_keys import Alias, Inert, torchtitan_rule, torchtitan_value

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
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.8)  # close spellings only
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
        parsed = _literal(value)
        if parsed is value and (hint is bool or (origin is list and args[0] is not str)):  # not a TOML value
            raise ConfigError(f"`{key}` = {value!r} is invalid: expected {_describe(hint)}")
        value = parsed
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


def _set(config: JobConfig, dotted: str, value: Any, from_cli: bool, foreign: dict[str, Any]) -> None:
    """Set one key; a torchtitan key without a field here is renamed (``Alias``) or kept in ``foreign`` to be
    judged once every key is loaded (``Inert``)."""
    sections = _sections()
    if "." not in dotted:
        raise ConfigError(f"`{dotted}` is not a config key: use --section.key (sections: {', '.join(sections)})")
    rule = torchtitan_rule(dotted)
    if isinstance(rule, Alias):
        dotted = rule.target
    elif isinstance(rule, Inert):
        foreign[dotted] = _literal(value) if from_cli else value
        return
    section_name, key = dotted.split(".", 1)
    if section_name not in sections:
        raise ConfigError(f"unknown config section `{section_name}`{_closest(section_name, list(sections))}; "
                          f"allowed: {', '.join(sections)}")
    section = getattr(config, section_name)
    hints = typing.get_type_hints(type(section))
    if key not in hints and from_cli and key.startswith("no_") and hints.get(key[3:]) is bool and value == "true":
        key, value = key[3:], "false"  # torchtitan's --section.no_key
    if key not in hints:
        raise ConfigError(f"unknown config key `{dotted}`{_closest(key, list(hints))}; "
                          f"keys of [{section_name}]: {', '.join(hints)}")
    setattr(section, key, _convert(dotted, torchtitan_value(dotted, value), hints[key], from_cli))


def _literal(value: str) -> Any:
    """A command-line value as TOML reads it; a bare word, not a TOML value, is returned as it is."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _flatten(table: dict[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    """``section.key`` pairs of a TOML table, nested tables (torchtitan's ``[quantize.linear.float8]``)
    dotted."""
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}", value


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
    assignments: list[tuple[str, Any, bool]] = []
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
            assignments += [(key, value, False) for key, value in _flatten(table, section_name)]
    assignments += [(key, value, True) for key, value in overrides]
    problems: list[str] = []
    foreign: dict[str, Any] = {}  # torchtitan keys without a field here, judged once every value is known
    for key, value, from_cli in assignments:
        try:
            _set(config, key, value, from_cli, foreign)
        except ConfigError as e:
            problems.append(str(e))
    for key, value in foreign.items():
        rule = torchtitan_rule(key)
        if not rule.accepts(value, config):
            problems.append(f"`{key}` = {value!r} asks for what titan_dsv4 does not have: {rule.instead}")
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems in the configuration:\n"
                          + "\n".join(f"  - {p}" for p in problems))
    return config


HELP_FLAGS = ("-h", "--help")


def print_help(text: str) -> None:
    """Print ``text`` to stdout; a reader that stops early (``--help | head``) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:  # Python flushes stdout once more at exit: point it at devnull
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def config_help(argv: list[str], usage: str) -> str | None:
    """The reference of every section and key when ``argv`` asks for it (``-h``/``--help``), else None:
    each key's value after the defaults, the TOML file and the overrides in ``argv``, and its description
    (the comments of ``job_config.py``)."""
    if not any(arg in HELP_FLAGS for arg in argv):
        return None
    config = load_config([arg for arg in argv if arg not in HELP_FLAGS])
    defaults = JobConfig()
    lines = [f"usage: {usage}", "",
             "Values come from the defaults, then the TOML file (--job.config_file), then the command line:",
             "--section.key value or --section.key=value; a bare --section.key is true; lists comma-separated.",
             "Shown: the values this command line gives; [default: ...] where they differ."]
    for section_name, section_type in _sections().items():
        lines += ["", f"[{section_name}]"]
        docs = field_docs(section_type)
        for key in typing.get_type_hints(section_type):
            value = getattr(getattr(config, section_name), key)
            default = getattr(getattr(defaults, section_name), key)
            doc = docs.get(key, "")
            if value != default:
                doc = f"{doc} [default: {_toml(default)}]".strip()
            head = f"  {key} = {_toml(value)}"
            if not doc:
                lines.append(head)
                continue
            wrapped = textwrap.wrap(doc, 110 - 42)
            lines.append(f"{head:<42}{wrapped[0]}" if len(head) < 41 else head)
            lines += [" " * 42 + w for w in (wrapped[1:] if len(head) < 41 else wrapped)]
    return "\n".join(lines)


def reference_markdown() -> str:
    """``docs/configuration.md``: every section and key with its default and description (the comments of
    ``job_config.py``), as ``python -m titan_dsv4.config`` prints it; a test keeps the page equal to this."""
    lines = ["# Configuration reference", "",
             "<!-- generated by `python -m titan_dsv4.config > docs/configuration.md` from "
             "titan_dsv4/config/job_config.py; do not edit -->", "",
             "Values come from the defaults below, then the TOML file (`--job.config_file`), then the command line: "
             "`--section.key value` or `--section.key=value`; a bare `--section.key` is true and "
             "`--section.no_key` false; lists are TOML (`'[[\"embed\", \"layers.0\"], [\"layers.1\"]]'`) or "
             "comma-separated. `python -m titan_dsv4.train --job.config_file X.toml --help` prints every key at "
             "the values that command line gives. torchtitan keys without a field here are listed in "
             "[torchtitan.md](torchtitan.md)."]
    defaults = JobConfig()
    for section_name, section_type in _sections().items():
        docs = field_docs(section_type)
        lines += ["", f"## [{section_name}]", "", "| key | default | meaning |", "|---|---|---|"]
        for key in typing.get_type_hints(section_type):
            default = _toml(getattr(getattr(defaults, section_name), key))
            lines.append(f"| `{key}` | `{default}` | {docs.get(key, '').replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


def field_docs(section: type) -> dict[str, str]:
    """Each field's description in its dataclass's source: its trailing comment and the comment lines that
    follow it, or, for a field without one, the comment lines just above it."""
    docs: dict[str, str] = {}
    pending: list[str] = []
    previous = None
    for line in inspect.getsource(section).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"\s+(\w+)\s*:[^#]*(?:#\s?(.*))?$", line)
        if not match:
            continue
        name, comment = match.groups()
        if pending and comment is None:  # comments above a field without its own: they describe it
            docs[name], pending = " ".join(pending), []
        elif pending and previous:  # comments after a described field continue its description
            docs[previous] += " " + " ".join(pending)
            pending = []
        if comment:
            docs[name] = comment.strip()
        previous = name
    if pending and previous:
        docs[previous] = (docs.get(previous, "") + " " + " ".join(pending)).strip()
    return docs


def _toml(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def config_to_dict(config: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
