"""One registry mechanism for every kind of pluggable part (teachers, students, methods).

Mirrors timm's `register_model`: factories are registered by name and looked up from the CLI.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import HgkdError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> factory mapping for one kind of component (e.g. ``"teacher"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, fn: Callable[..., T]) -> Callable[..., T]:
        """Decorator: register ``fn`` under its function name."""
        return self.register_as(fn.__name__)(fn)

    def register_as(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register a factory (or class) under ``name``."""
        def add(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = fn
            return fn
        return add

    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise HgkdError(f"unknown {self.kind} {name!r}; choose one of: {known}") from None

    def create(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._factories
