"""Envoy configurations for the benchmark: one listener, one route answered by Envoy itself
(direct_response), and only the authorization in front of it varying between rows. The sidecar
finds the permission through its catalog's route table, as it does for routes that do not set one.

Answering with direct_response keeps an upstream server out of every row, so the differences
between rows are the cost of authorization alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from authz_sidecar.local.tokens import DEMO_ISSUER

HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _cluster(name: str, port: int, http2: bool) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    ]
                }
            ],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _jwt_authn(jwks: Path, forward_payload: bool) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                "demo": {
                    "issuer": DEMO_ISSUER,
                    "local_jwks": {"filename": str(jwks)},
                    "payload_in_metadata": "jwt_payload",
                    # The HTTP variant receives no dynamic metadata: the payload travels in a header.
                    **({"forward_payload_header": "x-jwt-payload"} if forward_payload else {}),
                }
            },
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "demo"}}],
        },
    }


def _rbac(principals: list[str]) -> dict[str, Any]:
    """Envoy's in-process RBAC with the same allow-list enforced and a shadow policy evaluated."""

    def policy(names: list[str]) -> dict[str, Any]:
        return {
            "policies": {
                "viewers": {
                    "permissions": [{"url_path": {"path": {"prefix": "/things/"}}}],
                    "principals": [
                        {
                            "metadata": {
                                "filter": "envoy.filters.http.jwt_authn",
                                "path": [{"key": "jwt_payload"}, {"key": "sub"}],
                                "value": {"string_match": {"exact": n}},
                            }
                        }
                        for n in names
                    ],
                }
            }
        }

    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", **policy(principals)},
            "shadow_rules": {"action": "ALLOW", **policy(principals[:-1])},
        },
    }


def _ext_authz_grpc() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "1s"},
            "metadata_context_namespaces": ["envoy.filters.http.jwt_authn"],
        },
    }


def _ext_authz_http() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "http_service": {
                "server_uri": {"uri": "http://127.0.0.1", "cluster": "authz", "timeout": "1s"},
                "authorization_request": {
                    "allowed_headers": {
                        "patterns": [
                            {"exact": "authorization"},
                            {"exact": "x-authz-shadow-version"},
                            {"exact": "x-request-id"},
                            {"exact": "x-jwt-payload"},
                        ]
                    }
                },
                "authorization_response": {"allowed_upstream_headers": {"patterns": [{"prefix": "x-authz-"}]}},
            },
        },
    }


def build(
    kind: str,
    *,
    listen: int,
    admin: int,
    jwks: Path,
    authz_port: int = 0,
    principals: list[str] | None = None,
    authz_http2: bool = False,
) -> dict[str, Any]:
    """kind: floor | rbac | grpc | http. grpc/http point ext_authz at authz_port; `authz_http2` makes the
    HTTP variant speak HTTP/2 to it (for nghttpd, which serves nothing else)."""
    filters: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    if kind != "floor":
        filters.append(_jwt_authn(jwks, forward_payload=kind == "http"))
    if kind == "rbac":
        filters.append(_rbac(principals or ["alice"]))
    elif kind == "grpc":
        filters.append(_ext_authz_grpc())
        clusters.append(_cluster("authz", authz_port, http2=True))
    elif kind == "http":
        filters.append(_ext_authz_http())
        clusters.append(_cluster("authz", authz_port, http2=authz_http2))
    elif kind != "floor":
        raise ValueError(f"unknown Envoy variant {kind!r}")
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }
    )
    route: dict[str, Any] = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM_TYPE,
                                        "stat_prefix": "bench",
                                        "route_config": {
                                            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]
                                        },
                                        "http_filters": filters,
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


def write(config: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(config, indent=1))
    return path
