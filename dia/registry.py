"""A tiny name -> builder registry (timm-style), so groups of choices are data, not if/elif chains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from dia.errors import UserError, did_you_mean

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    schema: type | None  # structured-config dataclass validated for this choice


class Registry(Generic[T]):
    """Maps a choice name (as used in `group=name` on the command line) to an object and its schema."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, schema: type | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.group} '{name}' registered twice")
            self._entries[name] = Entry(name, obj, schema)
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise UserError(
                f"unknown {self.group} '{name}'{did_you_mean(str(name), self.names())}; "
                f"choose one of: {', '.join(self.names())}"
            )
        return self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def __contains__(self, name: Any) -> bool:
        return name in self._entries
