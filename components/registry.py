"""Registry of versioned components addressed as ``kind/name@version``.

Modelled on timm's ``create_model``: builders register themselves with a decorator, callers resolve a
spec string (an omitted version means the latest) and ``create`` instantiates it. Every run records the
*resolved* spec so it can be reproduced exactly.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from components.errors import SKFError

_SPEC_RE = re.compile(r"^(?P<kind>[a-z][a-z0-9_-]*)/(?P<name>[a-z0-9][a-z0-9_.-]*?)(?:@(?P<version>\d+))?$")

# Modules whose import registers the built-in components. Resolved lazily so that importing the
# registry stays cheap and free of heavy dependencies.
BUILTIN_MODULES: tuple[str, ...] = (
    "components.skb",
    "components.skb_oracle",
    "components.segmenter.skb",
    "components.se",
    "components.losses",
    "components.baselines",
)


class UnknownComponentError(SKFError, KeyError):
    """Raised when a spec does not match any registered component; the message lists what exists."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Spec:
    kind: str
    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> Spec:
        m = _SPEC_RE.match(text.strip())
        if not m:
            raise ValueError(
                f"invalid component spec {text!r}: expected 'kind/name' or 'kind/name@version' "
                "(e.g. 'skb/hrnet-w48-pascal@1')"
            )
        version = m.group("version")
        return cls(m.group("kind"), m.group("name"), int(version) if version else None)

    def __str__(self) -> str:
        base = f"{self.kind}/{self.name}"
        return base if self.version is None else f"{base}@{self.version}"


@dataclass(frozen=True)
class Entry:
    spec: Spec
    builder: Callable[..., Any]
    description: str

    @property
    def key(self) -> str:
        return str(self.spec)


_REGISTRY: dict[tuple[str, str, int], Entry] = {}
_loaded_builtins = False


def register(spec: str, description: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``builder`` under an explicit, versioned spec."""
    parsed = Spec.parse(spec)
    if parsed.version is None:
        raise ValueError(f"registration needs an explicit version: {spec!r}")

    def deco(builder: Callable[..., Any]) -> Callable[..., Any]:
        key = (parsed.kind, parsed.name, parsed.version)
        existing = _REGISTRY.get(key)
        if existing is not None and existing.builder is not builder:
            same = getattr(existing.builder, "__qualname__", None) == getattr(builder, "__qualname__", None)
            if not same:  # a module reload re-registers the same builder; anything else is a clash
                raise ValueError(f"component {spec} is already registered by {existing.builder!r}")
        doc = description or (builder.__doc__ or "").strip().splitlines()[0:1]
        text = doc if isinstance(doc, str) else (doc[0] if doc else "")
        _REGISTRY[key] = Entry(parsed, builder, text)
        return builder

    return deco


def load_builtins() -> None:
    """Import the modules that register the built-in components (once)."""
    global _loaded_builtins
    if _loaded_builtins:
        return
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real missing dependency inside the module must surface
                raise
    _loaded_builtins = True


def available(kind: str | None = None) -> list[str]:
    """Sorted list of registered specs (``kind/name@version``), optionally for one kind."""
    load_builtins()
    return sorted(
        (e.key for e in _REGISTRY.values() if kind is None or e.spec.kind == kind),
        key=_sort_key,
    )


def entries(kind: str | None = None) -> list[Entry]:
    load_builtins()
    return sorted(
        (e for e in _REGISTRY.values() if kind is None or e.spec.kind == kind), key=lambda e: _sort_key(e.key)
    )


def _sort_key(key: str) -> tuple[str, int]:
    base, _, version = key.partition("@")
    return base, int(version)


def resolve(spec: str | Spec) -> Entry:
    """Resolve a spec to its registry entry; an omitted version picks the highest one."""
    load_builtins()
    parsed = spec if isinstance(spec, Spec) else Spec.parse(spec)
    if parsed.version is not None:
        entry = _REGISTRY.get((parsed.kind, parsed.name, parsed.version))
    else:
        versions = [e for (k, n, _), e in _REGISTRY.items() if k == parsed.kind and n == parsed.name]
        entry = max(versions, key=lambda e: e.spec.version or 0) if versions else None
    if entry is None:
        known = available(parsed.kind) or available()
        scope = f"kind {parsed.kind!r}" if available(parsed.kind) else "the registry"
        raise UnknownComponentError(
            f"unknown component {str(parsed)!r}; available in {scope}: {', '.join(known) or '(none)'}"
        )
    return entry


def resolved_spec(spec: str | Spec) -> str:
    """The fully versioned spec string a (possibly unversioned) spec resolves to."""
    return resolve(spec).key


def create(spec: str | Spec, **kwargs: Any) -> Any:
    """Instantiate the component ``spec`` (latest version when omitted) with ``kwargs``."""
    return resolve(spec).builder(**kwargs)
