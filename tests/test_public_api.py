"""The package's public surface is deliberate: this pins it."""

import authz_sidecar


def test_exported_names() -> None:
    assert sorted(authz_sidecar.__all__) == sorted(
        [
            "AuthzError",
            "Catalog",
            "CompiledSet",
            "ConfigError",
            "DocumentError",
            "Evaluation",
            "Grant",
            "IdentityError",
            "Observation",
            "PermissionSet",
            "Reason",
            "Rollout",
            "Selection",
            "ShadowSet",
            "Snapshot",
            "__version__",
            "build_snapshot",
            "compile_set",
            "evaluate",
            "load_document",
            "parse_catalog",
            "parse_permission_set",
            "parse_shadow",
            "select",
            "stable_bucket",
        ]
    )
    for name in authz_sidecar.__all__:
        assert hasattr(authz_sidecar, name), name
