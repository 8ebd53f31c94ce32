"""Named registries: recipes name components by string, as timm's ``create_model`` does.

An unknown name raises a :class:`~medtl.errors.ConfigError` with a did-you-mean hint and the
allowed names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from medtl.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to entries of one kind (adapters, masking strategies, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@ADAPTERS.register("busi")`` adds the decorated object under ``name``."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        """Return the entry called ``name``, or raise naming the closest valid names."""
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        allowed = ", ".join(sorted(self._entries))
        raise ConfigError(f"unknown {self.kind} {name!r}{hint} (allowed: {allowed})")

    def validate(self, name: str) -> str:
        """For pydantic validators: ``name`` if registered, else a ValueError carrying the
        did-you-mean message (pydantic reports ValueErrors with the offending key)."""
        try:
            self.get(name)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return name

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
