"""Loading, validating, freezing and saving configs.

Precedence: schema defaults < `base:` files (in order, each resolved recursively) <
the config file < command-line flags. Every key and value is checked against
options/schema.py; problems raise ConfigError with a one-line message.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml

from options.registry import did_you_mean
from options.schema import Config, freeze


class ConfigError(ValueError):
    """A user error in a config file or flag; the message is one line."""


# ----------------------------------------------------------------------------- schema walking
def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def iter_keys(cls=Config, prefix: str = "") -> Iterator[Tuple[str, Any, dataclasses.Field]]:
    """Yield (dotted key, type, field) for every leaf of the schema."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, key + ".")
        else:
            yield key, tp, f


def _leaf_types() -> Dict[str, Any]:
    return {key: tp for key, tp, _ in iter_keys()}


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(c) for c in typing.get_args(tp))
    if origin is Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return "list of mappings" if typing.get_origin(item) is dict else f"list of {_describe(item)}"
    return getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------- value coercion
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _thaw(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _thaw(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the schema type `tp`, converting strings from the command line."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "~")):
            return None
        return coerce(value, args[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or str(value) == str(choice):
                return choice
        names = ", ".join(str(c) for c in choices)
        raise ConfigError(f"{key}: {value!r} is not one of {names}{did_you_mean(value, choices)}")
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = _parse_scalar(text, key)
            else:
                value = [_parse_scalar(v.strip(), key) for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping) or "name" not in value:
            raise ConfigError(f"{key}: expected a mapping with a 'name', got {value!r}")
        return freeze(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key}: {value!r} is not a boolean (use true or false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(str(value), 0)
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not an integer") from None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value))
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not a number") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: {value!r} is not a string")
    raise TypeError(f"unsupported schema type {tp!r} for {key}")


def _parse_scalar(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{key}: cannot parse {text!r}") from None


# ----------------------------------------------------------------------------- building
def _build(cls, data: Mapping[str, Any], prefix: str, source: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}{source}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for raw_key, value in data.items():
        name = str(raw_key).replace("-", "_")
        if name not in hints:
            full = [prefix + n for n in names]
            raise ConfigError(
                f"unknown key '{prefix}{raw_key}'{source}{did_you_mean(prefix + name, full)} "
                f"(keys here: {', '.join(names)})"
            )
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, f"{prefix}{name}.", source)
        else:
            kwargs[name] = coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any], source: str = "") -> Config:
    """Build a validated, read-only Config from a nested mapping (missing keys take defaults)."""
    return _build(Config, data, "", source)


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain nested dict (lists, not tuples) of a Config or any section of it."""
    return _thaw(cfg)


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for short lists of scalars (`scale: [0.1, 1.0]`)."""


def _represent_list(dumper: yaml.SafeDumper, data: list):
    flow = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def to_yaml(cfg: Any) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML, atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(to_yaml(cfg))
    os.replace(tmp, path)


def override(cfg: Config, changes: Mapping[str, Any]) -> Config:
    """A copy of cfg with dotted keys replaced (`{"model.num_classes": 10}`), validated."""
    data = to_dict(cfg)
    for dotted, value in changes.items():
        _set_dotted(data, dotted.replace("-", "_").split("."), value)
    return from_dict(data)


def _set_dotted(data: Dict[str, Any], parts: Sequence[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = _thaw(value)


def get_dotted(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ----------------------------------------------------------------------------- YAML files
def deep_merge(base: Dict[str, Any], top: Mapping[str, Any]) -> Dict[str, Any]:
    """Merge `top` into a copy of `base`; mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in top.items():
        key = str(key).replace("-", "_")
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str, _chain: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Read a config file with its `base:` files merged underneath it."""
    real = os.path.realpath(path)
    if real in _chain:
        cycle = " -> ".join(list(_chain[_chain.index(real):]) + [real])
        raise ConfigError(f"base: inheritance cycle {cycle}; remove one of these base entries")
    if not os.path.isfile(path):
        where = f" (a base of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {path}{where}; check the path")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}{at}: {problem}; fix the YAML syntax") from None
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    data = dict(data)
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: Dict[str, Any] = {}
    folder = os.path.dirname(path)
    for base in bases:
        merged = deep_merge(merged, load_yaml(os.path.join(folder, base), _chain + (real,)))
    return deep_merge(merged, data)


# ----------------------------------------------------------------------------- command line
def parse_flags(argv: Sequence[str]) -> Tuple[Dict[str, Tuple[str, str]], List[str]]:
    """Split argv into {dotted_key: (typed flag, raw value)} and bare switches (--help, ...).

    Accepts `--a.b-c value` and `--a.b-c=value`; dashes and underscores are equivalent.
    """
    flags: Dict[str, Tuple[str, str]] = {}
    switches: List[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.key value")
        body = arg[2:]
        if "=" in body:
            name, value = body.split("=", 1)
        elif "." not in body:
            switches.append(body)
            i += 1
            continue
        else:
            name = body
            if i + 1 >= len(args):
                raise ConfigError(f"--{name} needs a value")
            value = args[i + 1]
            i += 1
        flags[name.replace("-", "_")] = (f"--{name}", value)
        i += 1
    return flags, switches


def _check_flag_key(dotted: str, typed: str, leaves: Mapping[str, Any]) -> Any:
    if dotted in leaves:
        return leaves[dotted]
    raise ConfigError(f"unknown option {typed}{did_you_mean(dotted, leaves)}; see --help for every key")


def load_config(argv: Sequence[str] = ()) -> Config:
    """Resolve a Config from command-line style arguments (flags only, no switches)."""
    flags, switches = parse_flags(argv)
    if switches:
        raise ConfigError(f"unknown switch --{switches[0]}")
    return resolve(flags)


def resolve(flags: Mapping[str, Tuple[str, str]], base: Optional[Mapping[str, Any]] = None) -> Config:
    """Defaults < `base` (e.g. a checkpoint's stored config) < the config file < flags."""
    leaves = _leaf_types()
    cli: Dict[str, Any] = {}
    for dotted, (typed, raw) in flags.items():
        tp = _check_flag_key(dotted, typed, leaves)
        try:
            value = coerce(raw if _wants_raw(tp) else _parse_scalar(raw, dotted), tp, dotted)
        except ConfigError as e:
            raise ConfigError(f"{e} (from {typed})") from None
        _set_dotted(cli, dotted.split("."), value)

    data: Dict[str, Any] = _thaw(base) if base is not None else {}
    config_file = flags.get("common.config_file")
    if config_file:
        path = config_file[1]
        data = deep_merge(data, load_yaml(path))
        data.setdefault("common", {})
        data["common"] = dict(data["common"] or {}, config_file=path)
        source = f" in {path}"
    else:
        source = ""
    file_cfg = from_dict(data, source)  # validates the file's own keys with its name in messages
    return from_dict(deep_merge(to_dict(file_cfg), cli)) if cli else file_cfg


def _wants_raw(tp) -> bool:
    """Strings keep their text (a run label '007' must not become 7)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is Union else [tp]
    return args == [str]


def help_text(prog: str) -> str:
    lines = [
        f"usage: {prog} --common.config-file CONFIG.yaml [--section.key VALUE ...] [--print-config] [--help]",
        "",
        "Every key below can be set in the YAML file or as a flag (dashes or underscores).",
        "Lists: 3,4 or [3, 4]. Booleans: true/false. Precedence: defaults < base < file < flags.",
        "",
    ]
    default = Config()
    for key, tp, f in iter_keys():
        value = json.dumps(_thaw(get_dotted(default, key)))
        lines.append(f"  --{key.replace('_', '-')}  ({_describe(tp)}, default {value})")
        lines.append(f"        {f.metadata.get('help', '')}")
    return "\n".join(lines)
