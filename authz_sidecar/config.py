"""One typed, frozen configuration for ``serve``: defaults < AUTHZ_* environment < flags.

Validation is separate from construction (:func:`validate`), so the CLI can report every problem as
one clear line before anything binds a port.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from authz_sidecar.decision.identity import check_sources
from authz_sidecar.decision.tokens import DEFAULT_ALGORITHMS
from authz_sidecar.errors import ConfigError
from authz_sidecar.fronts.grpcfront import SERVER_MODELS, RpcLimits
from authz_sidecar.fronts.httpauthz import HttpLimits
from authz_sidecar.model.events import DEFAULT_CLOCK_SKEW
from authz_sidecar.store.etcd import EtcdOptions
from authz_sidecar.store.layout import normalise_prefix
from authz_sidecar.telemetry.decisionlog import DEFAULT_KEEP, DEFAULT_MAX_BYTES

STICKINESS = ("principal", "request_id")


# The fronts' own default bounds, which the settings start from.
_HTTP_LIMITS = HttpLimits()
_RPC_LIMITS = RpcLimits()


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = "127.0.0.1:9191"
    http: str = "127.0.0.1:9464"
    service: str = ""
    region: str = "local"
    etcd: tuple[str, ...] = ()
    prefix: str = "/authz"
    etcd_ca: Path | None = None
    etcd_cert: Path | None = None
    etcd_key: Path | None = None
    etcd_server_name: str = ""
    etcd_user: str = ""
    etcd_password: str = ""
    etcd_timeout: float = 5.0
    # A watch silent this long (progress is asked for every third of it) is reopened.
    etcd_liveness: float = 5.0
    # The sidecar's own files (the disk copy); None: $XDG_CACHE_HOME or ~/.cache. The image sets
    # AUTHZ_STATE_DIR to a directory it creates for its non-root user, which may have no home.
    state_dir: Path | None = None
    # Where the keys of the last good snapshot are kept; empty: derived (see cache_path), "off": none.
    cache_file: str = ""
    # Seconds without a word from etcd after which every Check denies; 0: never (the default).
    max_staleness: float = 0.0
    # Seconds between shadow reports written to etcd (each lives three of these).
    report_interval: float = 2.0
    catalog: Path | None = None
    policy_dir: Path | None = None
    poll_interval: float = 0.5
    # Empty: derived from what is configured (jwt_authn, jwt when a JWKS is given, mtls, header when named).
    identity: tuple[str, ...] = ()
    jwt_authn_payload_key: str = ""
    principal_claim: str = "sub"
    jwks_file: Path | None = None
    # JWKS fetched over HTTP(S) in the background (authz_sidecar/decision/jwks.py); exclusive with jwks_file.
    jwks_url: str = ""
    # Seconds between fetches, unless the answer's Cache-Control max-age is shorter.
    jwks_refresh_interval: float = 300.0
    # No two fetches closer than this, however many tokens with unknown kids ask for one.
    jwks_min_refresh_interval: float = 5.0
    jwks_timeout: float = 5.0
    jwt_issuers: tuple[str, ...] = ()
    jwt_audiences: tuple[str, ...] = ()
    jwt_algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    dev_principal_header: str = ""
    # Callers whose bare principal the application API believes (loopback, unix, none, CIDRs);
    # everyone else sends the end user's token.
    app_trusted_peers: tuple[str, ...] = ("loopback", "unix")
    payload_header: str = "x-jwt-payload"
    # Address of the HTTP variant of ext_authz; empty: not served.
    http_authz: str = ""
    # Bounds on what one HTTP ext_authz request may send (docs/operations.md#bounded-input); the
    # defaults are the front's own (HttpLimits): headers as Envoy's max_request_headers_kb 60, the URL
    # within them and alone up to 16 KiB, a request's whole time and a connection's idle time.
    http_authz_max_url_bytes: int = _HTTP_LIMITS.max_url_bytes
    http_authz_max_headers: int = _HTTP_LIMITS.max_headers
    http_authz_max_header_bytes: int = _HTTP_LIMITS.max_header_bytes
    http_authz_max_body_bytes: int = _HTTP_LIMITS.max_body_bytes
    http_authz_request_timeout: float = _HTTP_LIMITS.request_timeout
    http_authz_idle_timeout: float = _HTTP_LIMITS.idle_timeout
    # gRPC: RPCs in flight (queued ones included) and the size of one request message; the defaults
    # are the front's own (RpcLimits): Envoy's default circuit breaker, gRPC's own message limit.
    grpc_max_concurrent_rpcs: int = _RPC_LIMITS.max_concurrent_rpcs
    grpc_max_message_bytes: int = _RPC_LIMITS.max_message_bytes
    stickiness: str = "principal"
    grace: float = 5.0
    # How Check is served. The thread pool measured fastest here (docs/performance.md): the handler never
    # blocks, so a pool as large as the machine has cores keeps the GIL busy without contending for it.
    server_model: str = "threads"
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    log_level: str = "info"
    # Share of decisions logged as "decision" events; mismatches are always logged.
    log_decisions: float = 0.01
    # Every decision as a JSON line in this file (telemetry/decisionlog.py), for `ctl replay`;
    # None: off. Rotated when it would pass max_bytes, keeping `keep` rotated files.
    decision_log: Path | None = None
    decision_log_max_bytes: int = DEFAULT_MAX_BYTES
    decision_log_keep: int = DEFAULT_KEEP
    # Signed events (docs/app-api.md#signed-events): private keys as PEM files or directories of
    # them (the newest signs), or PEM text from AUTHZ_EVENT_KEY, which is never shown (repr=False).
    event_key: tuple[Path, ...] = ()
    event_key_pem: str = field(default="", repr=False)
    event_ttl: int = 3600
    event_max_ttl: int = 86400
    event_clock_skew: int = DEFAULT_CLOCK_SKEW

    def http_limits(self) -> HttpLimits:
        return HttpLimits(
            max_url_bytes=self.http_authz_max_url_bytes,
            max_headers=self.http_authz_max_headers,
            max_header_bytes=self.http_authz_max_header_bytes,
            max_body_bytes=self.http_authz_max_body_bytes,
            request_timeout=self.http_authz_request_timeout,
            idle_timeout=self.http_authz_idle_timeout,
        )

    def rpc_limits(self) -> RpcLimits:
        return RpcLimits(
            max_concurrent_rpcs=self.grpc_max_concurrent_rpcs, max_message_bytes=self.grpc_max_message_bytes
        )

    def etcd_options(self) -> EtcdOptions:
        return EtcdOptions(
            endpoints=self.etcd,
            ca_file=self.etcd_ca,
            cert_file=self.etcd_cert,
            key_file=self.etcd_key,
            server_name=self.etcd_server_name,
            user=self.etcd_user,
            password=self.etcd_password,
            timeout=self.etcd_timeout,
        )

    def cache_path(self) -> Path | None:
        """The disk copy of the last good snapshot: one file per service and prefix, in --state-dir,
        else under $XDG_CACHE_HOME (or ~/.cache), unless --cache-file says where, or 'off'."""
        if self.cache_file == "off":
            return None
        if self.cache_file:
            return Path(self.cache_file)
        name = f"{self.service or 'sidecar'}{self.prefix.rstrip('/').replace('/', '_')}.json"
        if self.state_dir is not None:
            return self.state_dir / name
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return base / "authz-sidecar" / name

    def identity_sources(self) -> tuple[str, ...]:
        if self.identity:
            return self.identity
        derived = ["jwt_authn"]
        if self.jwks_file or self.jwks_url:
            derived.append("jwt")
        derived.append("mtls")
        if self.dev_principal_header:
            derived.append("header")
        return tuple(derived)


# Limits that must be positive: a zero would refuse everything.
_POSITIVE = (
    "http_authz_max_url_bytes",
    "http_authz_max_headers",
    "http_authz_max_header_bytes",
    "http_authz_max_body_bytes",
    "http_authz_request_timeout",
    "http_authz_idle_timeout",
    "grpc_max_concurrent_rpcs",
    "grpc_max_message_bytes",
    "decision_log_max_bytes",
)


def parse_address(value: str, flag: str) -> tuple[str, int] | str:
    """``host:port`` -> (host, port); ``unix:///path`` -> the unix target string."""
    if value.startswith("unix:"):
        if len(value) <= len("unix:"):
            raise ConfigError(f"{flag}: {value!r} has no socket path")
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag}: {value!r} is not host:port or unix:///path")
    return host.strip("[]"), int(port)


def _validate_jwks(settings: Settings) -> None:
    """One key source; a URL over HTTP(S) only (urllib would open file:// and ftp:// as readily)."""
    if settings.jwks_file is not None and settings.jwks_url:
        raise ConfigError("give --jwks-file or --jwks-url, not both")
    if settings.jwks_url:
        url = urllib.parse.urlsplit(settings.jwks_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"--jwks-url {settings.jwks_url!r}: must be an http:// or https:// URL")
        if url.username is not None or url.password is not None:
            # urllib would take them for part of the host name; a JWKS is public anyway.
            raise ConfigError("--jwks-url: a user or password in the URL is not supported")
    if settings.jwks_refresh_interval <= 0 or settings.jwks_timeout <= 0:
        raise ConfigError("--jwks-refresh-interval and --jwks-timeout must be > 0")
    if settings.jwks_min_refresh_interval <= 0:
        raise ConfigError("--jwks-min-refresh-interval must be > 0 (it rate-limits fetches of the JWKS URL)")


def validate(settings: Settings) -> Settings:
    """Raise ConfigError on the first inconsistent setting; return the settings unchanged otherwise."""
    from authz_sidecar.fronts.appidentity import TrustedPeers

    TrustedPeers.parse(settings.app_trusted_peers)
    parse_address(settings.listen, "--listen")
    parse_address(settings.http, "--http")
    if settings.http_authz:
        parse_address(settings.http_authz, "--http-authz")
    if settings.policy_dir is None and not settings.etcd:
        raise ConfigError("no policy source: give --policy-dir DIR (or AUTHZ_POLICY_DIR)")
    if settings.etcd and settings.policy_dir is not None:
        raise ConfigError("give one policy source: --etcd or --policy-dir, not both")
    if settings.etcd:
        settings.etcd_options().validate()
        try:
            normalise_prefix(settings.prefix)
        except ValueError as exc:
            raise ConfigError(f"--prefix: {exc}") from None
        if settings.report_interval <= 0:
            raise ConfigError("--report-interval must be > 0")
        if settings.etcd_liveness <= 0 or settings.max_staleness < 0:
            raise ConfigError("--etcd-liveness must be > 0 and --max-staleness >= 0")
    if settings.state_dir is not None and settings.state_dir.exists() and not settings.state_dir.is_dir():
        raise ConfigError(f"--state-dir {settings.state_dir}: not a directory")
    if settings.policy_dir is not None and not settings.policy_dir.is_dir():
        raise ConfigError(f"--policy-dir {settings.policy_dir}: not a directory")
    _validate_jwks(settings)
    check_sources(
        settings.identity_sources(),
        has_keys=settings.jwks_file is not None or bool(settings.jwks_url),
        dev_header=settings.dev_principal_header,
    )
    if any(a.lower() == "none" for a in settings.jwt_algorithms):
        raise ConfigError("--jwt-algorithms: 'none' is never accepted")
    if settings.stickiness not in STICKINESS:
        raise ConfigError(f"--stickiness must be one of {', '.join(STICKINESS)}, not {settings.stickiness!r}")
    if settings.server_model not in SERVER_MODELS:
        raise ConfigError(f"--server-model must be {' or '.join(SERVER_MODELS)}, not {settings.server_model!r}")
    if not 0.0 <= settings.log_decisions <= 1.0:
        raise ConfigError("--log-decisions is a share of decisions, between 0 and 1")
    if settings.decision_log_keep < 0:
        raise ConfigError("--decision-log-keep must be >= 0 (rotated files kept)")
    if not 0 < settings.event_ttl <= settings.event_max_ttl or settings.event_clock_skew < 0:
        raise ConfigError("--event-ttl must be > 0 and <= --event-max-ttl, and --event-clock-skew >= 0")
    if settings.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if settings.grace < 0 or settings.poll_interval <= 0:
        raise ConfigError("--grace must be >= 0 and --poll-interval > 0")
    for name in _POSITIVE:
        if getattr(settings, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
    return settings
