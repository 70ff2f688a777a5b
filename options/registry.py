"""One generic registry for every kind of pluggable component.

Each component registers itself beside its definition::

    OPTIMIZERS = Registry("optimizer", config_key="optim.name")

    @OPTIMIZERS.register("sgd")
    def sgd(params, lr, weight_decay, momentum, nesterov): ...

The names a config may choose are listed once, as the Literal of the schema key
(options/schema.py); a registry given that key refuses to register any other name, and
`missing()` lists the choices nobody registered, so the two cannot drift apart. A lookup of
an unknown name raises a RegistryError that lists the known names and the closest match.
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, List, Optional, Tuple, TypeVar

from options.errors import did_you_mean
from options.schema import literal_choices

__all__ = ["Registry", "RegistryError", "did_you_mean"]

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown, duplicate or undeclared registry name. Its str() is the plain message."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """Named entries of one kind; `config_key` (e.g. "optim.name") is the schema key choosing one."""

    def __init__(self, kind: str, config_key: Optional[str] = None) -> None:
        self.kind = kind
        self.config_key = config_key
        self.choices: Optional[Tuple[str, ...]] = literal_choices(config_key) if config_key else None
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if self.choices is not None and name not in self.choices:
            raise RegistryError(
                f"{self.kind} '{name}' is not a choice of {self.config_key} ({', '.join(self.choices)}); "
                f"add it to the Literal of {self.config_key} in options/schema.py"
            )

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

    def missing(self) -> List[str]:
        """Choices of the schema key that no entry registered (empty when the lists agree)."""
        return [c for c in self.choices or () if c not in self._entries]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
