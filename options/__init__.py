"""The config system: typed defaults (schema.py), YAML + flags (config.py), registries."""
from options.config import (
    ConfigError,
    from_dict,
    get_dotted,
    load_config,
    override,
    save_config,
    to_dict,
    to_yaml,
)
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
