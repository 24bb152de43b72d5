"""Exceptions raised by authz-sidecar.

The tree of what reaches a user (the CLI prints one line for each and exits non-zero)::

    AuthzError                  base of everything the project raises on purpose
    +-- DocumentError           a permission set, shadow or catalog document is invalid;
    |                           carries the document, the field path and the offending value
    +-- ConfigError             settings (flags, AUTHZ_* variables) are invalid or inconsistent;
    |                           the command line exits 2 for it (a usage error)
    +-- IdentityError           a presented credential failed verification (maps to 401)
    +-- BindError               an address the settings name cannot be listened on (in use,
                                not permitted); the settings are fine, the machine is not: exit 1

Exceptions that stay inside one part, each defined beside the code that raises and handles it::

    store.policy.StoreError             a control-plane write refused; ctl prints it, exit 1
    +-- ConflictError                   a compare-and-swap lost to a concurrent write
    +-- OwnedElsewhereError             a handle another service registered
    +-- CatalogTooLargeError            a catalog over a bound, refused before it is sent
    store.etcd.WatchLostError           the watch ended or went silent: resume from the revision
    store.etcd.CompactedError           the resume revision was compacted: list again
    store.sources.etcd.EtcdMovedError   etcd was replaced or restored: list again
    model.routes.PathError (ValueError) a path that cannot be normalised: denied as malformed
    fronts.registry.RegistryError       a Registry call refused, with its gRPC status code
    telemetry.otlpexport.ExportError    one span export failed: counted as dropped

A deny is not an exception: the hot path returns an Outcome with a Reason. Exceptions are for
documents and settings, where the right reaction is to refuse the input and keep what was working.
"""

from __future__ import annotations

import errno
from typing import Any


class AuthzError(Exception):
    """Base class for the errors this project raises deliberately."""


class DocumentError(AuthzError):
    """An invalid document; the message names the document, the field and the value."""

    def __init__(self, message: str, *, document: str = "", field: str = "", value: Any = None) -> None:
        self.document = document
        self.field = field
        self.value = value
        where = ": ".join(part for part in (document, field) if part)
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(AuthzError):
    """Invalid settings; the message names the flag or variable."""


class IdentityError(AuthzError):
    """A credential was presented and failed verification."""


class BindError(AuthzError):
    """An address cannot be listened on (in use by another process, not permitted, not local)."""

    @classmethod
    def of(cls, flag: str, value: str, exc: OSError, owner: str) -> BindError:
        """One line naming the flag and why: in use (by another `owner`, likely), or the OS's reason."""
        why = f"address already in use (another {owner}?)" if exc.errno == errno.EADDRINUSE else exc.strerror
        why = why or str(exc)
        return cls(f"{flag} {value}: {why[:1].lower()}{why[1:]}")
