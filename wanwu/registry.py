"""A name-to-factory table with lazy imports, shared by stages, engines and models.

Heavy or optional backends (DALI, OpenVINO, torch) are registered by a
``"module:attribute"`` string and imported only when asked for, so the CLI and
the light processes start fast and tests run where a backend is absent.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, TypeVar

from wanwu.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories. Registering a name twice raises ``ConfigError``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # what is registered, for messages: "decoder", "engine", ...
        self._entries: dict[str, Callable[..., T] | str] = {}

    def register(self, name: str, target: Callable[..., T] | str | None = None) -> Any:
        """Register ``target`` under ``name``; without ``target``, acts as a decorator.

        ``target`` may be a callable or a lazy ``"package.module:attribute"`` string.
        """
        if target is None:
            def decorator(fn: Callable[..., T]) -> Callable[..., T]:
                self.register(name, fn)
                return fn
            return decorator
        existing = self._entries.get(name)
        if existing is not None and existing is not target:
            raise ConfigError(f"{self.kind} {name!r} is already registered ({existing!r})")
        self._entries[name] = target
        return target

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        """The factory for ``name``, importing its module if it was registered lazily."""
        try:
            target = self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; expected one of {', '.join(self.names())}"
            ) from None
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module_name), attr)
            self._entries[name] = target
        return target

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Call the factory for ``name`` with the given arguments."""
        return self.get(name)(*args, **kwargs)
