"""One config system for every stage: typed dataclasses -> YAML files -> dotted CLI overrides.

A config class is a plain ``@dataclass`` whose fields carry defaults; the docstring right under a
field (attribute docstring, as in litgpt) is its help text. ``load_config(Cls, path, overrides)``
reads YAML, applies ``a.b=value`` overrides, and builds the dataclass tree, checking every key and
type. Errors name the file and the dotted key, never just "invalid config".
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass; the message names the key."""


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right after each field)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and where lossless, convert) ``value`` to the annotated type ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans: take the word the choice spells
            words = ("on", "true", "yes") if value else ("off", "false", "no")
            value = next((a for a in get_args(tp) if isinstance(a, str) and a in words), value)
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{key}: must be one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) and origin is list:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = get_args(tp)[:1] or (Any,)
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a seed-like id written unquoted
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known keys here: {known})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field with no default was not given
        raise ConfigError(f"{prefix or 'config'}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{prefix}{e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict (YAML/JSON friendly)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], parsed value). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. learning_rate=2e-5)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), _fix_yaml_floats(value)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` texts to a nested mapping (values parsed as YAML scalars)."""
    for text in overrides:
        path, value = parse_override(text)
        try:
            set_dotted(data, ".".join(path), value)
        except ConfigError as e:
            raise ConfigError(f"override {text!r}: {e}") from None
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``key="a.b"``, creating sections on the way."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{part} is not a section")
        node = nxt
    node[parts[-1]] = value


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"galore.rank": 8, "eval": {...}}`` -> nested dicts (dotted keys split, at any depth)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        try:
            set_dotted(out, str(key), nest(value) if isinstance(value, dict) else value)
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"galore.rank": 8, ...}``: the inverse of ``nest``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def merge_dicts(into: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge into a copy: sections merge, values replace."""
    out = dict(into)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def _fix_yaml_floats(obj: Any) -> Any:
    """PyYAML (YAML 1.1) leaves ``2e-5`` as a string; turn such strings back into numbers."""
    if isinstance(obj, dict):
        return {k: _fix_yaml_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fix_yaml_floats(v) for v in obj]
    if isinstance(obj, str):
        try:
            if any(c in obj for c in "eE") and obj.strip()[0] in "0123456789.-+":
                return float(obj)
        except (ValueError, IndexError):
            return obj
    return obj


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return _fix_yaml_floats(data)


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    flags: dict[str, Any] | None = None,
) -> T:
    """The one way every command builds its config: defaults, then the YAML file (optional), then
    ``flags`` (dotted key -> value from named CLI flags or builder args; None = not given; values are
    set as given, never re-parsed, so a token like ``0123`` stays a string), then dotted ``key=value``
    overrides. Returns the validated dataclass; errors name the file and the dotted key."""
    data = read_yaml(path) if path else {}
    try:
        data = merge_dicts(data, nest({k: v for k, v in (flags or {}).items() if v is not None}))
        data = apply_overrides(data, list(overrides or []))
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


# --------------------------------------------------------------------------------------------
# CLI flags generated from the config classes
# --------------------------------------------------------------------------------------------

_FLAG_PREFIX = "config_flag:"


def _flag_type(tp: Any) -> tuple[Any, list | None]:
    """argparse ``type`` and ``choices`` for a field annotation (Optional unwrapped)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else str
    if get_origin(tp) is Literal:
        choices = list(get_args(tp))
        return type(choices[0]), choices
    if tp in (int, float, str):
        return tp, None
    return str, None


def add_config_flags(parser: Any, cls: type, keys: Any) -> None:
    """Named flags for some fields of ``cls``: ``keys`` lists dotted keys (flag ``--last-part``) or
    ``(flag_name, dotted_key)`` pairs. Type, choices, default and help come from the dataclass, so a
    flag never restates a default by hand. ``config_flags(args)`` gives the values for ``load_config``."""
    import argparse

    fields = {key: (tp, default, doc) for key, tp, default, doc in leaf_fields(cls)}
    for item in keys:
        name, key = item if isinstance(item, tuple) else (item.rsplit(".", 1)[-1], item)
        tp, default, doc = fields[key]
        flag = "--" + name.replace("_", "-")
        shown = f" (default: {default!r})" if default not in (None, "", [], {}, dataclasses.MISSING) else ""
        common: dict[str, Any] = {"dest": f"{_FLAG_PREFIX}{key}", "default": None, "help": f"{doc}{shown}".replace("%", "%%")}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
            continue
        arg_type, choices = _flag_type(tp)
        metavar = None if choices else key.rsplit(".", 1)[-1].upper()
        parser.add_argument(flag, type=arg_type, choices=choices, metavar=metavar, **common)


def add_config_arguments(parser: Any, example: str) -> None:
    """What every config-driven command takes: an optional YAML, dotted ``key=value`` overrides, and
    ``--help-config``. ``config_from_arguments`` reads them back."""
    parser.add_argument("config", nargs="?", help=f"config YAML (e.g. {example})")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, applied last")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")


def config_from_arguments(cls: type[T], args: Any, flags: dict[str, Any] | None = None) -> T | None:
    """The config of ``add_config_arguments`` (a first word with ``=`` is an override, not a file);
    None after printing the keys for ``--help-config``."""
    if args.help_config:
        print(format_help(cls))
        return None
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:
        config, overrides = None, [config, *overrides]
    return load_config(cls, config, overrides, flags={**config_flags(args), **(flags or {})})


def config_flags(args: Any) -> dict[str, Any]:
    """The dotted values of the flags ``add_config_flags`` made that the user gave (None = not given)."""
    return {k[len(_FLAG_PREFIX):]: v for k, v in vars(args).items() if k.startswith(_FLAG_PREFIX) and v is not None}


def dump_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False), encoding="utf-8")


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(dotted key, type, default, help) of every non-section field, recursively (dataclasses.MISSING =
    required)."""
    rows = []
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(leaf_fields(hints[f.name], f"{prefix}{f.name}."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        rows.append((f"{prefix}{f.name}", hints[f.name], default, docs.get(f.name, "")))
    return rows


def format_help(cls: type) -> str:
    """The text of ``--help-config``: every dotted key, its default and its help."""
    rows = [(key, "(required)" if d is dataclasses.MISSING else repr(d), doc) for key, _, d, doc in leaf_fields(cls)]
    width = max(len(r[0]) for r in rows) if rows else 0
    return "\n".join(f"  {k:<{width}}  {d:<14} {h}" for k, d, h in rows)
