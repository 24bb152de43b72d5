"""Envoy's config for one service, generated from the service's catalog.

A hand-written Envoy config drifts from the catalog the sidecar enforces: a route added to the
catalog but not to Envoy, a permission spelled twice. Here the catalog's route table becomes Envoy's
routes, each carrying its permission in ``context_extensions`` (so the sidecar skips its own route
lookup), and the rest of the config is the one arrangement that is known to be safe: ext_authz
fails closed, paths are normalised before routing, the tester's shadow header stops at Envoy, and
jwt_authn hands the verified payload to the sidecar.

Every part is built from Envoy's own API as typed messages (``envoy-data-plane``), so a misspelt
field or a value of the wrong type fails here, at generation, instead of when Envoy loads the file;
``envoy --mode validate`` then checks what only Envoy knows (tests run it on every generated config).

Matching mirrors the sidecar's route table (model/routes): literal segments before parameters, a
trailing slash ignored. A parameter matches a segment without ``%``: a percent-escaped path falls
through to the last route, which carries no permission, so the sidecar decodes and maps it itself
and Envoy never attaches a permission to a path the sidecar would read differently. A route whose
scope is a template (``account:{account}``) carries no permission either: Envoy cannot fill the
template, and a permission without its scope would be checked unscoped.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import betterproto2
import yaml
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType, ClusterDnsLookupFamily
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiVersion,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    Http2ProtocolOptions,
    HttpUri,
    Pipe,
    SocketAddress,
    TransportSocket,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    HeaderMatcher,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import CheckSettings, ExtAuthz, ExtAuthzPerRoute
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwtAuthentication,
    JwtProvider,
    JwtRequirement,
    JwtRequirementOrList,
    RemoteJwks,
    RequirementRule,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerPathWithEscapedSlashesAction,
    HttpConnectionManagerTracing,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import UpstreamTlsContext
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import RegexMatcher, StringMatcher
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.protobuf import Any as AnyMessage
from envoy_data_plane.google.protobuf import Empty

from authz_sidecar.errors import ConfigError
from authz_sidecar.model.routes import normalise_path
from authz_sidecar.model.values import Catalog, RouteSpec

SHADOW_HEADER = "x-authz-shadow-version"
# Where jwt_authn puts the verified payload; the sidecar reads it with --jwt-authn-payload-key.
JWT_PAYLOAD_KEY = "jwt_payload"
AUTHZ_CLUSTER = "authz_sidecar"
UPSTREAM_CLUSTER = "service"
OTLP_CLUSTER = "otel_collector"
JWKS_CLUSTER = "jwks"
_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
# A parameter is one segment that is not percent-escaped (see the module's docstring).
_PARAM_REGEX = "[^/%]+"
_HTTP2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": AnyMessage.pack(
        HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
        )
    )
}


@dataclass(frozen=True, slots=True)
class HostPort:
    """A TCP address; a host that is not an IP literal is resolved by DNS (STRICT_DNS), as in a
    compose network or a Kubernetes service."""

    host: str
    port: int

    @classmethod
    def parse(cls, value: str, flag: str) -> HostPort:
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{flag}: {value!r} is not HOST:PORT")
        return cls(host, int(port))

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class AuthzTarget:
    """Where Envoy reaches the sidecar: TCP (``HOST:PORT``) or a Unix socket shared in the pod
    (``unix:///path``)."""

    address: HostPort | None = None
    unix_path: str | None = None

    @classmethod
    def parse(cls, value: str, flag: str = "--authz") -> AuthzTarget:
        if value.startswith("unix:"):
            path = value.removeprefix("unix:").removeprefix("//")
            if not path.startswith("/"):
                raise ConfigError(f"{flag}: {value!r} is not unix:///absolute/path")
            return cls(unix_path=path)
        return cls(address=HostPort.parse(value, flag))


@dataclass(frozen=True, slots=True)
class JwtSettings:
    """jwt_authn's one provider: keys from a local file (a mounted JWKS) or fetched from the
    identity provider's JWKS URL."""

    issuer: str
    jwks_file: str | None = None
    jwks_uri: str | None = None
    audiences: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.jwks_file is None) == (self.jwks_uri is None):
            raise ConfigError("jwt_authn needs exactly one of --jwks-file and --jwks-uri")
        if self.jwks_uri is not None:
            parts = urlsplit(self.jwks_uri)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"--jwks-uri: {self.jwks_uri!r} is not an http(s) URL")


@dataclass(frozen=True, slots=True)
class EnvoyConfigOptions:
    """Everything the generated config depends on besides the catalog."""

    upstream: HostPort
    listen: HostPort = HostPort("0.0.0.0", 8080)  # noqa: S104 - Envoy fronts the service: it listens beyond the pod
    admin: HostPort = HostPort("127.0.0.1", 9901)
    authz: tuple[AuthzTarget, ...] = (AuthzTarget(address=HostPort("127.0.0.1", 9191)),)
    authz_timeout: timedelta = timedelta(milliseconds=250)
    jwt: JwtSettings | None = None
    otlp: HostPort | None = None
    trace_service_name: str = "envoy"
    route_permissions: bool = True
    extra_headers_to_remove: tuple[str, ...] = field(default=())


def _address(target: HostPort) -> Address:
    return Address(socket_address=SocketAddress(address=target.host, port_value=target.port))


def _cluster(name: str, targets: Sequence[HostPort | Address], *, http2: bool = False) -> Cluster:
    """A cluster over fixed addresses (STATIC) or DNS names (STRICT_DNS, re-resolved as they change)."""
    by_dns = any(isinstance(t, HostPort) and not t.is_ip for t in targets)
    addresses = [t if isinstance(t, Address) else _address(t) for t in targets]
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STRICT_DNS if by_dns else ClusterDiscoveryType.STATIC,
        dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED if by_dns else ClusterDnsLookupFamily.AUTO,
        connect_timeout=timedelta(milliseconds=250),
        typed_extension_protocol_options=_HTTP2 if http2 else {},
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=a)) for a in addresses])],
        ),
    )


def path_regex(template: str) -> str:
    """The RE2 pattern Envoy matches for a catalog path template (``/things/{id}``)."""
    if "{" not in template:
        path = normalise_path(template)
        parts = [p for p in path.split("/") if p]
        return "/" + "/".join(re.escape(p) for p in parts) + ("/?" if parts else "")
    parts = [p for p in template.split("/") if p]
    return "/" + "/".join(_PARAM_REGEX if _PARAM.fullmatch(p) else re.escape(p) for p in parts) + "/?"


def _order(route: RouteSpec) -> tuple[bool, tuple[bool, ...]]:
    """The sidecar's precedence: literal paths, then templates most literal segment first."""
    parts = [p for p in route.path.split("/") if p]
    return ("{" in route.path, tuple(bool(_PARAM.fullmatch(p)) for p in parts))


def _per_route(route: RouteSpec) -> dict[str, AnyMessage]:
    if route.scope is not None and "{" in route.scope:
        return {}  # the sidecar fills the scope from the path (see the module's docstring)
    extensions = {"permission": route.permission}
    if route.scope:
        extensions["scope"] = route.scope
    settings = ExtAuthzPerRoute(check_settings=CheckSettings(context_extensions=extensions))
    return {"envoy.filters.http.ext_authz": AnyMessage.pack(settings)}


def routes(catalog: Catalog, *, with_permissions: bool = True) -> list[Route]:
    """One Envoy route per catalog route, in the sidecar's order, then everything else to the
    service with no permission: the sidecar maps it with the catalog or denies it as unmapped."""
    out = [
        Route(
            name=f"{route.method} {route.path}",
            match=RouteMatch(
                safe_regex=RegexMatcher(regex=path_regex(route.path)),
                headers=[HeaderMatcher(name=":method", string_match=StringMatcher(exact=route.method))],
            ),
            route=RouteAction(cluster=UPSTREAM_CLUSTER),
            typed_per_filter_config=_per_route(route) if with_permissions else {},
        )
        for route in sorted(catalog.routes, key=_order)
    ]
    out.append(Route(name="unmapped", match=RouteMatch(prefix="/"), route=RouteAction(cluster=UPSTREAM_CLUSTER)))
    return out


def _jwt_filter(jwt: JwtSettings) -> HttpFilter:
    if jwt.jwks_uri is not None:
        keys: dict[str, Any] = {
            "remote_jwks": RemoteJwks(
                http_uri=HttpUri(uri=jwt.jwks_uri, cluster=JWKS_CLUSTER, timeout=timedelta(seconds=5)),
                cache_duration=timedelta(minutes=5),
            )
        }
    else:
        keys = {"local_jwks": DataSource(filename=jwt.jwks_file)}
    provider = JwtProvider(
        issuer=jwt.issuer,
        audiences=list(jwt.audiences),
        payload_in_metadata=JWT_PAYLOAD_KEY,
        forward=True,
        **keys,
    )
    # A request without a token passes on, so the sidecar answers it (401, with its reason); a
    # token that does not verify is refused here.
    requirement = JwtRequirement(
        requires_any=JwtRequirementOrList(
            requirements=[JwtRequirement(provider_name="idp"), JwtRequirement(allow_missing=Empty())]
        )
    )
    config = JwtAuthentication(
        providers={"idp": provider},
        rules=[RequirementRule(match=RouteMatch(prefix="/"), requires=requirement)],
    )
    return HttpFilter(name="envoy.filters.http.jwt_authn", typed_config=AnyMessage.pack(config))


def _authz_filter(options: EnvoyConfigOptions) -> HttpFilter:
    config = ExtAuthz(
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=False,  # the sidecar unreachable or late: the request is denied
        status_on_error=HttpStatus(code=StatusCode.Forbidden),
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=AUTHZ_CLUSTER), timeout=options.authz_timeout
        ),
        metadata_context_namespaces=["envoy.filters.http.jwt_authn"],
        include_peer_certificate=True,
    )
    return HttpFilter(name="envoy.filters.http.ext_authz", typed_config=AnyMessage.pack(config))


def _jwks_cluster(uri: str) -> Cluster:
    parts = urlsplit(uri)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    cluster = _cluster(JWKS_CLUSTER, [HostPort(host, parts.port or (443 if https else 80))])
    if https:
        cluster.transport_socket = TransportSocket(
            name="envoy.transport_sockets.tls", typed_config=AnyMessage.pack(UpstreamTlsContext(sni=host))
        )
    return cluster


def bootstrap(catalog: Catalog, options: EnvoyConfigOptions) -> Bootstrap:
    """The whole config as Envoy's Bootstrap message."""
    http_filters = [_jwt_filter(options.jwt)] if options.jwt is not None else []
    http_filters += [
        _authz_filter(options),
        HttpFilter(name="envoy.filters.http.router", typed_config=AnyMessage.pack(Router())),
    ]
    manager = HttpConnectionManager(
        stat_prefix="ingress",
        # One spelling of a path for the route, the sidecar and the service (the sidecar normalises
        # again anyway); an escaped slash is refused rather than guessed at, as the sidecar does.
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.REJECT_REQUEST,
        route_config=RouteConfiguration(
            name=catalog.service,
            virtual_hosts=[
                VirtualHost(
                    name=catalog.service,
                    domains=["*"],
                    routes=routes(catalog, with_permissions=options.route_permissions),
                )
            ],
            # The tester's choice of set is for the sidecar only; the service never sees it.
            request_headers_to_remove=[SHADOW_HEADER, *options.extra_headers_to_remove],
        ),
        http_filters=http_filters,
    )
    clusters = [
        _cluster(
            AUTHZ_CLUSTER,
            [Address(pipe=Pipe(path=t.unix_path)) if t.unix_path else t.address for t in options.authz],  # type: ignore[misc]
            http2=True,
        ),
        _cluster(UPSTREAM_CLUSTER, [options.upstream]),
    ]
    if options.otlp is not None:
        manager.tracing = HttpConnectionManagerTracing(
            provider=_otel_provider(options.trace_service_name),
        )
        clusters.append(_cluster(OTLP_CLUSTER, [options.otlp], http2=True))
    if options.jwt is not None and options.jwt.jwks_uri is not None:
        clusters.append(_jwks_cluster(options.jwt.jwks_uri))
    listener = Listener(
        name="ingress",
        address=_address(options.listen),
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(name="envoy.filters.network.http_connection_manager", typed_config=AnyMessage.pack(manager))
                ]
            )
        ],
    )
    return Bootstrap(
        admin=Admin(address=_address(options.admin)),
        static_resources=BootstrapStaticResources(listeners=[listener], clusters=clusters),
    )


def _otel_provider(service_name: str) -> Any:
    from envoy_data_plane.envoy.config.trace.v3 import TracingHttp

    config = OpenTelemetryConfig(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=OTLP_CLUSTER), timeout=timedelta(milliseconds=250)
        ),
        service_name=service_name,
    )
    return TracingHttp(name="envoy.tracers.opentelemetry", typed_config=AnyMessage.pack(config))


def render(catalog: Catalog, options: EnvoyConfigOptions, *, source: str = "") -> str:
    """The config as YAML with Envoy's field names, headed by where it came from."""
    document = bootstrap(catalog, options).to_dict(casing=betterproto2.Casing.SNAKE)
    # Protobuf leaves a field at its default out; this one a reviewer looks for, so it is written.
    manager = document["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for http_filter in manager["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.ext_authz":
            http_filter["typed_config"]["failure_mode_allow"] = False
    origin = f" from {source}" if source else ""
    header = (
        f"# Envoy in front of {catalog.service!r}, generated by `authz-sidecar envoy-config`{origin}.\n"
        "# Regenerate it when the catalog changes rather than editing it (docs/envoy.md).\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False)
