"""Loading, validating, freezing and saving configs.

Precedence: schema defaults < a base mapping (e.g. a checkpoint's stored config) <
`base:` files (in order, each resolved recursively) < the config file < command-line
flags. Every key and value is checked against options/schema.py, once, after the layers
are merged; problems raise ConfigError with a one-line message naming the key, the bad
value, the valid range or fix, and where the value came from (file or flag).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml

from options.errors import ConfigError, FieldError, did_you_mean
from utils.files import atomic_write_text
from options.schema import Config, freeze, hints, iter_keys, non_null

# Where a value came from, for messages: "in FILE", "from --flag", "in the base config".
Where = Callable[[str], str]


def _at(where: str) -> str:
    return f" ({where})" if where else ""


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(c) for c in typing.get_args(tp))
    if origin is Union:
        return f"{_describe(non_null(tp))} or null"
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return "list of mappings" if typing.get_origin(item) is dict else f"list of {_describe(item)}"
    return getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------- renamed keys
# Old spellings get one line saying what to write instead (configs and checkpoints written
# before the rename). (new key, why) for a plain rename; (None, advice) where there is no
# one-to-one replacement.
RENAMED_KEYS: Dict[str, Tuple[Optional[str], str]] = {
    "common.log_freq": ("common.log_every_batches", "it counts batches, not optimizer steps"),
    "common.max_iterations_per_epoch": ("common.max_batches_per_epoch", "it counts batches, not optimizer steps"),
    "scheduler.cyclic.max_lr": (None, "the cyclic schedule changed, a cycle now peaks at epochs_per_cycle * "
                                      "min_lr; set scheduler.cyclic.min_lr and epochs_per_cycle instead"),
    "scheduler.cyclic.cycles": (None, "the cyclic schedule changed; set scheduler.cyclic.total_cycles (cycles "
                                      "including the last, annealing one) and epochs_per_cycle instead"),
}
RENAMED_VALUES: Dict[Tuple[str, Any], str] = {
    ("dataset.cache", "gpu"): "write dataset.cache: memory (or disk) and dataset.augment_on: device",
}


def _renamed_key(key: str, flag: bool = False) -> Optional[str]:
    """The one-line advice for an old key, spelled as a flag or as a YAML key; None if not old."""
    if key not in RENAMED_KEYS:
        return None
    new, why = RENAMED_KEYS[key]
    spell = (lambda k: "--" + k.replace("_", "-")) if flag else (lambda k: k)
    if new is None:
        return f"{spell(key)} no longer exists: {why}"
    return f"{spell(key)} is now {spell(new)}: {why}"


def _upgrade_stored(data: Dict[str, Any]) -> Dict[str, Any]:
    """A stored config (a checkpoint's, as plain dicts) in today's keys, changed in place.

    Unlike a user's file, a stored config cannot be edited, so old keys are renamed rather
    than refused; retired keys are dropped, since evaluating or exporting an old checkpoint
    needs none of them (only the training schedule changed).
    """
    for old, (new, _) in RENAMED_KEYS.items():
        *path, leaf = old.split(".")
        node: Any = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            value = node.pop(leaf)
            if new is not None:
                _set_dotted(data, new.split("."), value)
    dataset = data.get("dataset")
    if isinstance(dataset, dict) and dataset.get("cache") == "gpu":
        dataset.update(cache="memory", augment_on="device")
    return data


# ----------------------------------------------------------------------------- value coercion
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def to_dict(value: Any) -> Any:
    """Plain nested data (dicts, lists) of a Config, any section of it, or any value in one."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: to_dict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_dict(v) for v in value]
    return value


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the schema type `tp`, converting strings from the command line."""
    origin = typing.get_origin(tp)
    if origin is Union:
        if value is None or (isinstance(value, str) and value.lower() in ("null", "~")):
            return None
        return coerce(value, non_null(tp), key)
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
        if type(value) is int and value in (0, 1):  # `--common.compile 1`: YAML has made the "1" an int
            return bool(value)
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
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if isinstance(value, (int, float)) else float(str(value))
        except (ValueError, OverflowError):
            raise ConfigError(f"{key}: {value!r} is not a number") from None
        if not math.isfinite(number):  # YAML reads 1e400 as the text '1e400': float() makes it inf
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return number
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
def _build(cls, data: Any, prefix: str, where: Where):
    if not isinstance(data, Mapping):
        key = prefix.rstrip(".") or "config"
        raise ConfigError(f"{key}: expected a mapping of keys, got {data!r}{_at(where(key))}")
    types = hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: Dict[str, Any] = {}
    for raw_key, value in data.items():
        name = str(raw_key).replace("-", "_")
        key = prefix + name
        if name in kwargs:
            raise ConfigError(f"{prefix}{raw_key}: given twice (also as {name}); keep one{_at(where(key))}")
        if name not in types:
            old = _renamed_key(key)
            if old is not None:
                raise ConfigError(old + _at(where(key)))
            full = [prefix + n for n in fields]
            place = f" {where(key)}" if where(key) else ""
            raise ConfigError(
                f"unknown key '{prefix}{raw_key}'{place}{did_you_mean(key, full)} (keys here: {', '.join(fields)})"
            )
        tp = types[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, {} if value is None else value, key + ".", where)
            continue
        if isinstance(value, str) and (key, value) in RENAMED_VALUES:
            raise ConfigError(f"{key}: {value!r} no longer exists: {RENAMED_VALUES[key, value]}{_at(where(key))}")
        try:
            kwargs[name] = coerce(value, tp, key)
        except ConfigError as e:
            valid = fields[name].metadata.get("valid")
            rule = f"; it must be {valid}" if valid is not None else ""
            raise ConfigError(f"{e}{rule}{_at(where(key))}") from None
    try:
        return cls(**kwargs)
    except FieldError as e:  # the section's own range and cross-field checks (options/schema.py)
        key = prefix + e.field
        raise ConfigError(f"{key}: {e.problem}{_at(where(key))}") from None


def from_dict(data: Mapping[str, Any], source: str = "") -> Config:
    """Build a validated, read-only Config from a nested mapping (missing keys take defaults).

    `source` (e.g. "in run/config.yaml") is added to every message.
    """
    return _build(Config, data, "", lambda key: source)


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
    atomic_write_text(path, to_yaml(cfg))


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
    node[parts[-1]] = to_dict(value)


def get_dotted(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ----------------------------------------------------------------------------- YAML files
MAX_CONFIG_BYTES = 1 << 20  # configs are a few KB; anything near this is not a config
# The shipped configs: config/ beside the packages, in a checkout and in an installed wheel alike.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases and duplicate keys.

    Aliases are refused while composing, before anything is built, so a file of nested
    aliases (a "billion laughs" of a few hundred bytes) is one line, not minutes of copying.
    Keys equal up to dashes/underscores are duplicates, as the config treats them as one.
    """

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.MarkedYAMLError(
                problem="anchors and aliases (&name, *name) are not allowed in config files; write the values out",
                problem_mark=event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: Dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            same = str(key).replace("-", "_")
            if same in seen:
                raise yaml.MarkedYAMLError(
                    problem=f"duplicate key {key!r} (first at line {seen[same]}); keep one",
                    problem_mark=key_node.start_mark,
                )
            seen[same] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: str) -> Any:
    """The YAML data of one file (UTF-8, no aliases, no duplicate keys, not empty)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; that is not a config file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        byte = raw[e.start]
        raise ConfigError(f"{path}:{line}: byte 0x{byte:02x} is not UTF-8 text; save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        fix = "" if "; " in problem else "; fix the YAML syntax"
        raise ConfigError(f"{path}{at}: {problem}{fix}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config file") from None
    if data is None:
        raise ConfigError(f"{path} is empty; write at least one section or remove the file")
    return data


def _base_files(path: str, bases: Any) -> List[str]:
    """`base:` as a list of file names: one string or a list of strings."""
    if bases is None:
        return []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list):
        raise ConfigError(
            f"{path}: base: {bases!r} must be a file name or a list of file names, e.g. base: [../parts/common.yaml]"
        )
    for i, base in enumerate(bases):
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: base[{i}]: {base!r} is not a file name; write base: [file.yaml, ...]")
    return bases


def _record(origins: Dict[str, str], data: Mapping[str, Any], where: str, prefix: str = "") -> None:
    """Note `where` as the origin of every key of `data` (sections keep their first origin)."""
    for raw_key, value in data.items():
        key = prefix + str(raw_key).replace("-", "_")
        if isinstance(value, Mapping):
            origins.setdefault(key, where)
            _record(origins, value, where, key + ".")
        else:
            origins[key] = where


def _origin(origins: Mapping[str, str], key: str) -> str:
    key = key.split("[")[0]
    node = key
    while node:
        if node in origins:
            return origins[node]
        node = node.rpartition(".")[0]
    return next((w for k, w in origins.items() if k.startswith(key + ".")), "")


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> Dict[str, Any]:
    """Merge `top` into a copy of `base`; mappings merge key by key (`a-b` and `a_b` are one key),
    anything else is replaced."""
    out = {str(key).replace("-", "_"): value for key, value in base.items()}
    for key, value in top.items():
        key = str(key).replace("-", "_")
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str, _chain: Tuple[str, ...] = (), origins: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Read a config file with its `base:` files merged underneath it.

    `origins`, when given, receives the file each key came from (for messages).
    """
    real = os.path.realpath(path)
    if real in _chain:
        cycle = " -> ".join(list(_chain[_chain.index(real):]) + [real])
        raise ConfigError(f"base: inheritance cycle {cycle}; remove one of these base entries")
    if not os.path.isfile(path):
        where = f" (a base of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {path}{where}; check the path")
    data = read_yaml(path)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    data = dict(data)
    bases = _base_files(path, data.pop("base", None))
    merged: Dict[str, Any] = {}
    folder = os.path.dirname(path)
    for base in bases:
        merged = deep_merge(merged, load_yaml(os.path.join(folder, base), _chain + (real,), origins))
    if origins is not None:
        _record(origins, data, f"in {path}")
    return deep_merge(merged, data)


def shipped_configs() -> List[str]:
    """Names of the configs shipped with the package (`mobilevit_tiny`, `paper/table3_no_vbs`, ...)."""
    names = []
    for folder, _, files in os.walk(CONFIG_DIR):
        rel = os.path.relpath(folder, CONFIG_DIR)
        names += [os.path.normpath(os.path.join(rel, f[:-5])) for f in files if f.endswith(".yaml")]
    return sorted(names)


def find_config_file(name: str) -> str:
    """The config file `name` means: a path as given; a bare name without .yaml that is no path
    (`mobilevit_tiny`, `paper/table3_no_vbs`) is the config of that name shipped in config/,
    so installed console scripts work outside a checkout."""
    if os.path.exists(name) or name.endswith((".yaml", ".yml")):
        return name
    shipped = os.path.join(CONFIG_DIR, name + ".yaml")
    if os.path.isfile(shipped):
        return shipped
    names = shipped_configs()
    top = [n for n in names if "/" not in n]
    raise ConfigError(f"config file not found: {name}{did_you_mean(name, names)}; give the path of a .yaml file "
                      f"or the name of a shipped config: {', '.join(top)} (and paper/..., recipes/...)")


# ----------------------------------------------------------------------------- command line
def parse_flags(argv: Sequence[str], once: bool = False) -> Tuple[Dict[str, Tuple[str, str]], List[str]]:
    """Split argv into {dotted_key: (typed flag, raw value)} and bare switches (help, print-config).

    Accepts `--a.b-c value` and `--a.b-c=value`; dashes and underscores are equivalent. A
    following `--x` is never taken as a value: `--common.run-label --common.seed=3` would name
    the run folder after the seed flag (a value starting with -- needs the `=` form).

    once: a key given twice (in any spelling) is a ConfigError, as a duplicate YAML key is: for
    the command line a person typed. Otherwise the last value wins, so that library callers can
    append overrides to a list of flags.
    """
    flags: Dict[str, Tuple[str, str]] = {}
    switches: List[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-h":
            switches.append("help")
            i += 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.key value")
        body = arg[2:]
        if "=" in body:
            name, value = body.split("=", 1)
        elif "." not in body:
            switches.append(body.replace("_", "-"))
            i += 1
            continue
        else:
            name = body
            following = args[i + 1] if i + 1 < len(args) else None
            if following is None or following.startswith("--"):
                got = "" if following is None else f", not the option {following}"
                raise ConfigError(f"--{name} needs a value{got}; write --{name} VALUE "
                                  f"(or --{name}=VALUE for a value starting with --)")
            value = following
            i += 1
        key = name.replace("-", "_")
        if once and key in flags:  # keeping either value silently would hide the other
            first, hint = flags[key], _TWICE_HINTS.get(key, "give it once")
            raise ConfigError(f"{first[0]} is given twice ({first[1]!r} and {value!r}); {hint}")
        flags[key] = (f"--{name}", value)
        i += 1
    return flags, switches


_TWICE_HINTS = {"common.config_file": "give one config file; it can merge others through its `base:` list"}


def _check_flag_key(dotted: str, typed: str, leaves: Mapping[str, Any]) -> Any:
    if dotted in leaves:
        return leaves[dotted]
    old = _renamed_key(dotted, flag=True)
    if old is not None:
        raise ConfigError(old)
    raise ConfigError(f"unknown option {typed}{did_you_mean(dotted, leaves)}; see --help for every key")


def load_config(argv: Sequence[str] = (), base: Optional[Mapping[str, Any]] = None) -> Config:
    """Resolve a Config from command-line style flags (no switches); raises ConfigError.

    The library form of options.cli.parse_config, for tests, tools and sweeps: `base` is a
    config mapping placed beneath the config file (e.g. a checkpoint's stored config).
    """
    flags, switches = parse_flags(argv)
    if switches:
        raise ConfigError(f"unknown switch --{switches[0]}; only entry points take --help and --print-config")
    return resolve(flags, base)


def resolve(flags: Mapping[str, Tuple[str, str]], base: Optional[Mapping[str, Any]] = None) -> Config:
    """Defaults < `base` (e.g. a checkpoint's stored config) < the config file < flags."""
    leaves = {key: tp for key, tp, _ in iter_keys()}
    origins: Dict[str, str] = {}
    data: Dict[str, Any] = {}
    if base is not None:
        data = _upgrade_stored(to_dict(base))
        _record(origins, data, "in the base config")
    config_file = flags.get("common.config_file")
    if config_file:
        path = find_config_file(config_file[1])
        flags = {**flags, "common.config_file": (config_file[0], path)}  # the run records the file it read
        data = deep_merge(data, load_yaml(path, origins=origins))
    cli: Dict[str, Any] = {}
    for dotted, (typed, raw) in flags.items():
        tp = _check_flag_key(dotted, typed, leaves)
        try:
            value = raw if _wants_raw(tp) else _parse_scalar(raw, dotted)
        except ConfigError as e:
            raise ConfigError(f"{e} (from {typed})") from None
        _set_dotted(cli, dotted.split("."), value)
        origins[dotted] = f"from {typed}"
    return _build(Config, deep_merge(data, cli), "", lambda key: _origin(origins, key))


def _wants_raw(tp) -> bool:
    """Strings keep their text (a run label '007' must not become 7)."""
    return non_null(tp) is str


def _rule(tp, valid) -> str:
    """`, >= 1` (or `, each >= 1` for a list) for --help; '' for a key without a range."""
    if valid is None:
        return ""
    return f", each {valid}" if typing.get_origin(non_null(tp)) is tuple else f", {valid}"


def help_text(prog: str) -> str:
    lines = [
        f"usage: {prog} --common.config-file CONFIG.yaml [--section.key VALUE ...] [--print-config] [--help]",
        "",
        "Every key below can be set in the YAML file or as a flag (dashes or underscores).",
        "Lists: 3,4 or [3, 4]. Booleans: true/false. Precedence: defaults < base < file < flags.",
        "--print-config prints the resolved config as YAML after every check, and exits.",
        "Exit status: 0 done, 1 run failed, 2 bad config or input, 128+N stopped by signal N.",
        "",
    ]
    default = Config()
    for key, tp, f in iter_keys():
        value = json.dumps(to_dict(get_dotted(default, key)))
        rule = _rule(tp, f.metadata.get("valid"))
        lines.append(f"  --{key.replace('_', '-')}  ({_describe(tp)}{rule}, default {value})")
        lines.append(f"        {f.metadata.get('help', '')}")
    return "\n".join(lines)
