"""One generic registry for every kind of pluggable component.

Each component registers itself beside its definition::

    OPTIMIZERS = Registry("optimizer")

    @OPTIMIZERS.register("sgd")
    def build_sgd(params, cfg): ...

A lookup of an unknown name raises a KeyError that lists the known names and the
closest match, so a typo is never silently ignored.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Generic, Iterator, List, TypeVar

T = TypeVar("T")


def did_you_mean(word: str, candidates) -> str:
    """A ' — did you mean 'x'?' suffix for the closest candidate, or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.5)
    return f" — did you mean '{close[0]}'?" if close else ""


class RegistryError(KeyError):
    """Unknown or duplicate registry name. Its str() is the plain message."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(
                    f"{self.kind} '{name}' is registered twice "
                    f"({self._entries[name]!r} and {obj!r}); pick another name"
                )
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names())
            raise RegistryError(
                f"unknown {self.kind} '{name}'; known: {known}{did_you_mean(name, self.names())}"
            ) from None

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
