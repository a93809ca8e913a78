"""Registries of config-built components: a name → factory table, a decorator to add to it, and the
build step that keeps what the config turns on (a factory returns ``None`` for "off")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Factory = Callable[[Any], Any]


def registrar(table: dict[str, Factory], kind: str) -> Callable[[str], Callable[[Factory], Factory]]:
    """``register(name)`` decorator adding a factory to ``table`` (a name is registered once)."""

    def register(name: str) -> Callable[[Factory], Factory]:
        def decorator(factory: Factory) -> Factory:
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered")
            table[name] = factory
            return factory

        return decorator

    return register


def build_enabled(table: dict[str, Factory], cfg: Any) -> dict[str, Any]:
    """Every registered factory's product for ``cfg``, by name in registration order, ``None`` left out."""
    built = {name: factory(cfg) for name, factory in table.items()}
    return {name: item for name, item in built.items() if item is not None}
