"""The package's public surface is deliberate: ``__all__`` is exactly what ``authz_sidecar`` re-exports,
and every name is defined inside the package (no third-party object leaks out as ours)."""

from __future__ import annotations

import types

import authz_sidecar


def test_all_is_exactly_what_the_package_re_exports() -> None:
    exported = {
        name
        for name, value in vars(authz_sidecar).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert sorted(authz_sidecar.__all__) == sorted(exported | {"__version__"})


def test_every_public_name_is_the_packages_own() -> None:
    for name in authz_sidecar.__all__:
        value = getattr(authz_sidecar, name)
        if name != "__version__":
            assert getattr(value, "__module__", "").startswith("authz_sidecar."), name
