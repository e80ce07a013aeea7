"""A small name -> builder registry, with third-party plugins found through entry points."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

log = logging.getLogger(__name__)


class RegistryError(KeyError):
    """A name that is unknown, taken twice, or built with arguments it does not take."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def describe(builder: Callable[..., Any]) -> str:
    """``module.QualifiedName`` of a builder, for messages."""
    return f"{getattr(builder, '__module__', '?')}.{getattr(builder, '__qualname__', repr(builder))}"


class Registry:
    """Maps names to builders (a class or a function). ``group`` is the entry-point group scanned for plugins."""

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._builders: dict[str, Callable[..., Any]] = {}
        self._scanned = False

    def register(self, name: str, builder: Callable[..., Any] | None = None):
        """Register ``builder`` under ``name``; usable as ``@registry.register("name")``."""

        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders and self._builders[name] is not fn:
                raise RegistryError(f"{self.kind} '{name}' is already registered (by {describe(self._builders[name])})")
            self._builders[name] = fn
            return fn

        return add(builder) if builder is not None else add

    def load_entry_points(self) -> None:
        """Register every plugin of the entry-point group; a plugin that fails to load is reported and skipped,
        one that takes a name already registered (a built-in's) is an error naming both."""
        self._scanned = True
        if self.group is None:
            return
        for ep in entry_points(group=self.group):
            try:
                builder = ep.load()
            except Exception as e:  # a broken third-party plugin must not break the built-ins
                log.warning("%s plugin '%s' (%s) failed to load: %s", self.kind, ep.name, ep.value, e)
                continue
            taken = self._builders.get(ep.name)
            if taken is not None and taken is not builder:
                self._scanned = False  # every later look-up fails the same way until the plugin is renamed
                source = f" of package {ep.dist.name}" if ep.dist is not None else ""
                raise RegistryError(
                    f"{self.kind} plugin '{ep.name}' ({ep.value}{source}) takes the name of "
                    f"{describe(taken)}; rename the plugin's entry point in its group {self.group}")
            self.register(ep.name, builder)

    def _scan_once(self) -> None:
        if not self._scanned:
            self.load_entry_points()

    def get(self, name: str) -> Callable[..., Any]:
        self._scan_once()
        if name not in self._builders:
            raise RegistryError(f"unknown {self.kind} '{name}'; valid: {', '.join(self.list())}")
        return self._builders[name]

    def list(self) -> list[str]:
        self._scan_once()
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        self._scan_once()
        return name in self._builders

    def build(self, name: str, **kwargs: Any) -> Any:
        """Call the builder of ``name``; keyword arguments it does not take fail with the list of those it does."""
        builder = self.get(name)
        params = inspect.signature(builder).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            valid = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
            unknown = sorted(set(kwargs) - set(valid))
            if unknown:
                raise RegistryError(
                    f"{self.kind} '{name}' got unknown argument(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
                )
        return builder(**kwargs)
