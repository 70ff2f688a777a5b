"""The config system: typed defaults and ranges (schema.py), YAML + flags (config.py),
the entry points' front door (cli.py), registries (registry.py)."""
from options.config import (
    from_dict,
    get_dotted,
    load_config,
    override,
    save_config,
    to_dict,
    to_yaml,
)
from options.errors import ConfigError
from options.registry import Registry, RegistryError
from options.schema import Config

__all__ = [
    "Config",
    "ConfigError",
    "Registry",
    "RegistryError",
    "from_dict",
    "get_dotted",
    "load_config",
    "override",
    "save_config",
    "to_dict",
    "to_yaml",
]
