"""The config system's error types and its did-you-mean helper (imports nothing of ours)."""
from __future__ import annotations

import difflib
from typing import Iterable


class ConfigError(ValueError):
    """A user error in a config file or flag; the message is one line."""


class FieldError(ConfigError):
    """A bad value of one field, raised by a schema section that does not know its own path.

    The loader (options/config.py) re-raises it as a ConfigError naming the full dotted key
    and where the value came from; built directly in Python, `field` is the section's field.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def did_you_mean(word: object, candidates: Iterable[object]) -> str:
    """A ' — did you mean 'x'?' suffix for the closest candidate, or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.5)
    return f" — did you mean '{close[0]}'?" if close else ""
