"""A tiny name -> object registry (timm-style), so groups of choices are data, not if/elif chains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from dia.errors import UserError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a choice name (as used in `group=name` on the command line) to its code.

    A choice's settings are not here: they are its YAML (dia.config.schema), so composing a config never
    imports the code.
    """

    def __init__(self, group: str) -> None:
        self.group = group
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            old = self._entries.get(name)
            if old is not None and old is not obj and _where(old) != _where(obj):
                raise ValueError(f"{self.group} '{name}' registered twice ({_where(old)} and {_where(obj)})")
            self._entries[name] = obj  # the same definition run again (a notebook cell) replaces the old one
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Forget `name` (a choice defined for one experiment or one test)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        """The registered names, sorted (as error messages list the choices)."""
        return sorted(self._entries)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UserError(
                f"unknown {self.group} '{name}'{did_you_mean(str(name), self.names())}; "
                f"choose one of: {', '.join(self.names())}"
            )
        return self._entries[name]

    def __contains__(self, name: Any) -> bool:
        return name in self._entries

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
