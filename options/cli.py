"""Command-line front door shared by main_train, main_eval and the tools.

Only entry points call this: it turns a ConfigError into one line on stderr and
exit status 2, and answers --help and --print-config.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence, TypeVar

from options.config import ConfigError, help_text, parse_flags, resolve, to_yaml
from options.registry import RegistryError
from options.schema import Config

T = TypeVar("T")


def fail(message: str, status: int = 2) -> "NoReturn":  # noqa: F821
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def parse_args(argv: Optional[Sequence[str]], prog: str, description: str = "") -> Config:
    """Resolve the config from argv; --help and --print-config print and exit 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        flags, switches = parse_flags(argv)
        for switch in switches:
            if switch not in ("help", "print-config", "print_config"):
                raise ConfigError(f"unknown switch --{switch}; the switches are --help and --print-config")
        if "help" in switches:
            print((description + "\n\n" if description else "") + help_text(prog))
            raise SystemExit(0)
        cfg = resolve(flags)
    except ConfigError as e:
        fail(str(e))
    if "print-config" in switches or "print_config" in switches:
        print(to_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg


def run_or_exit(fn: Callable[[], T]) -> T:
    """Run an entry point's body, reporting user errors (bad config, bad data) as one line."""
    try:
        return fn()
    except (ConfigError, RegistryError) as e:
        fail(str(e))
