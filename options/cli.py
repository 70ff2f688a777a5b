"""Command-line front door shared by main_train, main_eval, main_export and the tools.

Only entry points call this: it answers --help and --print-config, and turns a
ConfigError into one line on stderr and exit status 2. Library code (tests, tools,
sweeps) uses options.config.load_config, which raises instead of exiting.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Mapping, NoReturn, Optional, Sequence

from options.config import help_text, parse_flags, resolve, to_yaml
from options.errors import ConfigError, did_you_mean
from options.schema import Config

SWITCHES = ("help", "print-config")


def fail(message: str, status: int = 2) -> NoReturn:
    """`error: message` on stderr (always one line) and exit with `status`."""
    try:
        print("error: " + " ".join(str(message).splitlines()), file=sys.stderr)
    except (BrokenPipeError, ValueError):  # stderr closed: the status still says it
        pass
    raise SystemExit(status)


def _print_and_exit(text: str) -> NoReturn:
    """Print to stdout and exit 0, quietly when the reader has gone (`--help | head -1`)."""
    try:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit, which would raise once more; writes to
        # /dev/null succeed.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(0)


def parse_config(
    argv: Optional[Sequence[str]],
    prog: str,
    doc: str = "",
    *,
    check: Optional[Callable[[Config], None]] = None,
    base: Optional[Callable[[Mapping[str, str]], Optional[Mapping]]] = None,
    listings: Optional[Mapping[str, Callable[[], str]]] = None,
) -> Config:
    """The resolved, checked config of an entry point; exits on --help, --print-config or an error.

    argv: the arguments (None: sys.argv[1:]). prog and doc head the --help text.
    check(cfg): extra checks needing component knowledge (e.g. cvnets.check_config), raising
        ValueError naming the key; they run before --print-config prints, so it refuses what
        training refuses.
    base(flags): a config mapping placed beneath the config file (main_eval: the checkpoint's
        stored config) or None; `flags` maps each dotted key given on the command line
        (underscores) to its value as typed, e.g. {"model.checkpoint": "run/checkpoint_best.pt"}.
    listings: extra switches that print a text and exit 0 (main_train: --list-transforms).
    A ConfigError (or a check's ValueError) is `error: <message>` on stderr and SystemExit(2).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    listings = dict(listings or {})
    known = SWITCHES + tuple(listings)
    try:
        flags, switches = parse_flags(argv, once=True)
        for switch in switches:
            if switch not in known:
                raise ConfigError(
                    f"unknown switch --{switch}{did_you_mean(switch, known)}; "
                    f"the switches are {', '.join('--' + s for s in known)}"
                )
        if "help" in switches:
            _print_and_exit((doc.strip() + "\n\n" if doc.strip() else "") + help_text(prog))
        for switch in switches:
            if switch in listings:
                _print_and_exit(listings[switch]())
        stored = base({key: raw for key, (_, raw) in flags.items()}) if base is not None else None
        cfg = resolve(flags, base=stored)
        if check is not None:
            check(cfg)
    except ValueError as e:  # a ConfigError, or a component's check naming its key
        fail(str(e))
    if "print-config" in switches:
        _print_and_exit(to_yaml(cfg))
    return cfg
