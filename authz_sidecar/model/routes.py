"""Map a request's method and path to the permission handle that guards it.

The path is normalised before matching so that two spellings of one resource cannot get two
answers: the query is dropped, percent-escapes are decoded, doubled slashes are merged, dot segments
are resolved (never above the root) and a trailing slash is ignored. An escaped slash or backslash
(%2F, %5C) is refused rather than guessed at, because upstreams disagree on whether it separates
segments. Templates are compiled once per snapshot into a dict of exact paths plus, per method and
segment count, the parameterised templates ordered most-literal first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from authz_sidecar.caches import remember
from authz_sidecar.model.values import RouteSpec

_ESCAPED_SEPARATOR = re.compile(r"%(?:2f|5c)", re.IGNORECASE)
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_PATH_LENGTH = 8192


class PathError(ValueError):
    """The path cannot be normalised safely; the request is denied as malformed."""


def normalise_path(raw: str) -> str:
    """Return the canonical form of a request target's path, or raise PathError."""
    if len(raw) > MAX_PATH_LENGTH:
        raise PathError("path too long")
    path = raw.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        raise PathError("path must start with '/'")
    if "%" in path:
        if _ESCAPED_SEPARATOR.search(path):
            raise PathError("escaped '/' or '\\' in path")
        try:
            path = unquote(path, errors="strict")
        except UnicodeDecodeError:
            raise PathError("percent-escapes that are not UTF-8") from None
    if "\x00" in path or "\\" in path:
        raise PathError("NUL or backslash in path")
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return "/" + "/".join(out)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    permission: str
    scope: str | None


@dataclass(frozen=True, slots=True)
class _Template:
    segments: tuple[str | None, ...]  # None marks a parameter
    names: tuple[str, ...]
    permission: str
    scope: str | None


_CACHE_LIMIT = 16_384
_MALFORMED = object()


class RouteTable:
    """Routes of one service, compiled for matching. Immutable once built, apart from a bounded
    cache of raw paths already resolved (a pure function of the path, so it can never be stale)."""

    __slots__ = ("_cache", "_exact", "_templates")

    def __init__(self, routes: Iterable[RouteSpec]) -> None:
        exact: dict[tuple[str, str], RouteMatch] = {}
        templates: dict[tuple[str, int], list[_Template]] = {}
        for route in routes:
            path = normalise_path(route.path) if "{" not in route.path else route.path.rstrip("/") or "/"
            parts = [p for p in path.split("/") if p]
            params = [_PARAM.fullmatch(p) for p in parts]
            if not any(params):
                exact.setdefault((route.method, path), RouteMatch(route.permission, route.scope))
                continue
            template = _Template(
                segments=tuple(None if m else p for p, m in zip(parts, params, strict=True)),
                names=tuple(m.group(1) for m in params if m),
                permission=route.permission,
                scope=route.scope,
            )
            templates.setdefault((route.method, len(parts)), []).append(template)
        for bucket in templates.values():
            # Most literal segments first, then leftmost literal first: /things/new before /things/{id}.
            bucket.sort(key=lambda t: tuple(s is None for s in t.segments))
        self._exact = exact
        self._templates = {k: tuple(v) for k, v in templates.items()}
        self._cache: dict[tuple[str, str], object] = {}

    def resolve(self, method: str, raw_path: str) -> RouteMatch | None:
        """Normalise a request target and match it; raise PathError when it is unsafe.

        The query string never affects the answer, so it is dropped before the cache lookup.
        """
        key = (method, raw_path.partition("?")[0])
        found = self._cache.get(key)
        if found is None:
            try:
                found = self.match(method, normalise_path(key[1]))
            except PathError:
                found = _MALFORMED
            remember(self._cache, key, found, _CACHE_LIMIT)
        if found is _MALFORMED:
            raise PathError("unsafe path")
        return found  # type: ignore[return-value]

    def match(self, method: str, path: str) -> RouteMatch | None:
        """Match an already normalised path; fill the scope template from the captured parameters."""
        found = self._exact.get((method, path))
        if found is not None:
            return found
        parts = path.split("/")[1:] if path != "/" else []
        for template in self._templates.get((method, len(parts)), ()):
            values: list[str] = []
            for want, got in zip(template.segments, parts, strict=True):
                if want is None:
                    values.append(got)
                elif want != got:
                    break
            else:
                scope = template.scope
                if scope is not None and "{" in scope:
                    for name, value in zip(template.names, values, strict=True):
                        scope = scope.replace("{" + name + "}", value)
                return RouteMatch(template.permission, scope)
        return None

    def __len__(self) -> int:
        return len(self._exact) + sum(len(v) for v in self._templates.values())
