"""Where the ``authz.check`` spans go and how: the OTLP exporter of the OpenTelemetry specification.

The settings are the specification's variables, each ``OTEL_EXPORTER_OTLP_TRACES_<X>`` winning over
``OTEL_EXPORTER_OTLP_<X>``, an empty value counting as unset: ``PROTOCOL`` (``grpc``, the default,
or ``http/protobuf``), ``ENDPOINT`` (for OTLP/HTTP the traces variable is the full URL, used as it
is, while the generic one is a base to which ``v1/traces`` is appended), ``HEADERS`` (``k=v,k2=v2``,
values percent-decoded), ``TIMEOUT`` (milliseconds, 10000 by default, 0 for none), ``COMPRESSION``
(``gzip`` or ``none``), ``INSECURE`` (gRPC endpoints without a scheme), ``CERTIFICATE``,
``CLIENT_CERTIFICATE`` and ``CLIENT_KEY``.

Settings the exporter could never use (``http/json``, an unknown protocol, a malformed header or
URL, a missing certificate file) are refused at start-up with one line naming the variable, rather
than leaving a sidecar that runs and drops every span; a header's value is never repeated in a
message, because headers carry credentials. An unreadable timeout or an unknown compression falls
back to the default with a warning, as the specification asks, since the export still works.

The transports run on the exporter thread only. Each ``send`` is bounded by the timeout and turns
every failure into ``ExportError``; the caller drops the batch and backs off, so a collector that is
slow, down or hostile costs spans, never a Check. OTLP/HTTP keeps one connection open between
exports (http.client) and reads at most 64 KiB of an answer.
"""

from __future__ import annotations

import gzip
import http.client
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import grpc
import structlog

from authz_sidecar import __version__
from authz_sidecar.errors import ConfigError

log = structlog.get_logger("authz_sidecar.telemetry.tracing")

GRPC, HTTP_PROTOBUF = "grpc", "http/protobuf"
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
DEFAULT_ENDPOINTS = {GRPC: "http://localhost:4317", HTTP_PROTOBUF: "http://localhost:4318"}
DEFAULT_TIMEOUT = 10.0
USER_AGENT = f"authz-sidecar/{__version__} OTel-OTLP-Exporter"
MAX_ANSWER = 64 * 1024
_GENERIC, _TRACES = "OTEL_EXPORTER_OTLP_", "OTEL_EXPORTER_OTLP_TRACES_"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (RFC 9110)
_GRPC_KEY = re.compile(r"[0-9a-z_.-]+")  # a gRPC metadata key
_PRINTABLE = re.compile(r"[\x20-\x7e]*")  # what both protocols take as a header value
# Headers the transport writes itself: set from the environment they would corrupt every export.
_RESERVED = frozenset(
    {"content-type", "content-length", "content-encoding", "transfer-encoding", "host", "te", "connection", "upgrade"}
)


@dataclass(frozen=True, slots=True)
class ExportSettings:
    protocol: str
    endpoint: str  # gRPC: the channel target (host:port or any gRPC target); HTTP: the URL posted to
    secure: bool
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # values may be credentials
    timeout: float | None = DEFAULT_TIMEOUT  # seconds; None: no limit
    gzip: bool = False
    certificate: Path | None = None
    client_certificate: Path | None = None
    client_key: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ExportSettings:
        """The settings the variables describe; ConfigError for one the exporter could not use."""
        protocol = _protocol(environ)
        endpoint, secure = _endpoint(environ, protocol)
        client_certificate, client_key = _file(environ, "CLIENT_CERTIFICATE"), _file(environ, "CLIENT_KEY")
        if (client_certificate is None) != (client_key is None):
            raise ConfigError(f"{_GENERIC}CLIENT_CERTIFICATE and {_GENERIC}CLIENT_KEY go together")
        settings = cls(
            protocol,
            endpoint,
            secure,
            _headers(environ, protocol),
            _timeout(environ),
            _gzip(environ),
            _file(environ, "CERTIFICATE"),
            client_certificate,
            client_key,
        )
        if settings.certificate or settings.client_certificate:
            tls_context(settings)  # a certificate or key that does not load is refused now, not per export
        return settings


def _lookup(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """(variable, value) of the traces variable if set, else of the generic one."""
    for variable in (_TRACES + name, _GENERIC + name):
        value = environ.get(variable, "").strip()
        if value:
            return variable, value
    return None


def _protocol(environ: Mapping[str, str]) -> str:
    found = _lookup(environ, "PROTOCOL")
    if found is None:
        return GRPC  # the sidecar's default since it first exported; the specification allows it
    variable, value = found
    if value.lower() in (GRPC, HTTP_PROTOBUF):
        return value.lower()
    if value.lower() == "http/json":
        raise ConfigError(
            f"{variable}: 'http/json' is not supported; use http/protobuf (every OTLP/HTTP collector takes it) or grpc"
        )
    raise ConfigError(f"{variable}: {value!r} is not an OTLP protocol (grpc or http/protobuf)")


def _endpoint(environ: Mapping[str, str], protocol: str) -> tuple[str, bool]:
    """(target, secure). OTLP/HTTP: the traces URL as given (an empty path is /), or the generic
    base with v1/traces appended. gRPC: host:port of an http(s) URL, whose scheme decides TLS;
    anything else is a gRPC target, with TLS unless OTEL_EXPORTER_OTLP_INSECURE is true."""
    traces = environ.get(_TRACES + "ENDPOINT", "").strip()
    generic = environ.get(_GENERIC + "ENDPOINT", "").strip()
    variable = _TRACES + "ENDPOINT" if traces else _GENERIC + "ENDPOINT"
    url = traces or generic or DEFAULT_ENDPOINTS[protocol]
    has_scheme = url.lower().startswith(("http://", "https://"))
    if protocol == GRPC and not has_scheme:
        return url, not _boolean(environ, "INSECURE")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{variable}: {url!r} has an invalid port") from None
    if not has_scheme or not parts.hostname:
        raise ConfigError(f"{variable}: {url!r} is not an http:// or https:// URL")
    scheme = parts.scheme.lower()
    if protocol == GRPC:
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"{host}:{port or (443 if scheme == 'https' else 80)}", scheme == "https"
    if traces:
        path = parts.path or "/"
    else:
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        path += "v1/traces"
    netloc = parts.netloc.rpartition("@")[2]  # credentials in the URL would be logged, and http.client ignores them
    return urlunsplit((scheme, netloc, path, parts.query, "")), scheme == "https"


def _boolean(environ: Mapping[str, str], name: str) -> bool:
    found = _lookup(environ, name)
    if found is None:
        return False
    variable, value = found
    if value.lower() not in ("true", "false"):
        log.warning("otlp_setting_ignored", variable=variable, value=value, using="false")
    return value.lower() == "true"


def _timeout(environ: Mapping[str, str]) -> float | None:
    found = _lookup(environ, "TIMEOUT")
    if found is None:
        return DEFAULT_TIMEOUT
    variable, value = found
    if not value.isdigit():  # not a non-negative whole number of milliseconds
        log.warning("otlp_setting_ignored", variable=variable, value=value, using=f"{DEFAULT_TIMEOUT * 1000:.0f} ms")
        return DEFAULT_TIMEOUT
    milliseconds = int(value)
    if 0 < milliseconds < 100:
        log.warning("otlp_timeout_short", variable=variable, milliseconds=milliseconds, note="the unit is milliseconds")
    return milliseconds / 1000 if milliseconds else None


def _gzip(environ: Mapping[str, str]) -> bool:
    found = _lookup(environ, "COMPRESSION")
    if found is None:
        return False
    variable, value = found
    if value.lower() not in ("gzip", "none"):
        log.warning("otlp_setting_ignored", variable=variable, value=value, using="none")
    return value.lower() == "gzip"


def _headers(environ: Mapping[str, str], protocol: str) -> tuple[tuple[str, str], ...]:
    found = _lookup(environ, "HEADERS")
    if found is None:
        return ()
    variable, raw = found
    headers = []
    for number, entry in enumerate(raw.split(","), 1):
        if not entry.strip():
            continue
        key, equals, value = entry.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ConfigError(f"{variable}: entry {number} is not key=value")
        if not _TOKEN.fullmatch(key):
            raise ConfigError(f"{variable}: {key!r} is not a header name")
        key = key.lower()
        if key in _RESERVED or key.startswith("grpc-"):
            raise ConfigError(f"{variable}: {key!r} is reserved (the exporter sets it)")
        if protocol == GRPC and (not _GRPC_KEY.fullmatch(key) or key.endswith("-bin")):
            raise ConfigError(f"{variable}: {key!r} cannot be sent as gRPC metadata")
        value = unquote(value.strip())
        if not _PRINTABLE.fullmatch(value):
            raise ConfigError(f"{variable}: the value of {key!r} is not printable ASCII once percent-decoded")
        headers.append((key, value))
    return tuple(headers)


def _file(environ: Mapping[str, str], name: str) -> Path | None:
    found = _lookup(environ, name)
    if found is None:
        return None
    variable, value = found
    if not Path(value).is_file():
        raise ConfigError(f"{variable} {value}: not a file")
    return Path(value)


def tls_context(settings: ExportSettings) -> ssl.SSLContext:
    """The client context for an https endpoint: the system's roots or the configured CA, and the
    client certificate if one is configured."""
    try:
        context = ssl.create_default_context(cafile=settings.certificate)
        if settings.client_certificate and settings.client_key:
            context.load_cert_chain(settings.client_certificate, settings.client_key, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        names = f"{_GENERIC}CERTIFICATE / CLIENT_CERTIFICATE / CLIENT_KEY"
        raise ConfigError(f"{names}: cannot load ({exc.strerror or exc})") from None
    return context


# --- transports -----------------------------------------------------------------------------------


class ExportError(Exception):
    """One export did not reach the collector or was refused by it; the message says why."""


class Transport(Protocol):
    def send(self, request: bytes) -> None: ...

    def close(self) -> None: ...


def transport(settings: ExportSettings) -> Transport:
    return GrpcTransport(settings) if settings.protocol == GRPC else HttpTransport(settings)


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


class GrpcTransport:
    """TraceService/Export over one channel; the request is already serialised."""

    def __init__(self, settings: ExportSettings) -> None:
        options = [("grpc.primary_user_agent", USER_AGENT)]
        if settings.secure:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(settings.certificate),
                private_key=_read(settings.client_key),
                certificate_chain=_read(settings.client_certificate),
            )
            self._channel = grpc.secure_channel(settings.endpoint, credentials, options)
        else:
            self._channel = grpc.insecure_channel(settings.endpoint, options)
        self._export: Any = self._channel.unary_unary(
            EXPORT_METHOD, request_serializer=None, response_deserializer=None
        )
        self._timeout = settings.timeout
        self._metadata = settings.headers or None
        self._compression = grpc.Compression.Gzip if settings.gzip else None

    def send(self, request: bytes) -> None:
        try:
            self._export(request, timeout=self._timeout, metadata=self._metadata, compression=self._compression)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            raise ExportError(code.name if code is not None else str(exc)) from None

    def close(self) -> None:
        self._channel.close()


class HttpTransport:
    """POST to the traces URL over one kept-alive HTTP/1.1 connection (https with the configured
    TLS). The timeout bounds the whole export: what is left of it is the socket's timeout before
    each step (connect, send, the answer's head, its body)."""

    def __init__(self, settings: ExportSettings) -> None:
        parts = urlsplit(settings.endpoint)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._target = parts.path + (f"?{parts.query}" if parts.query else "")
        self._context = tls_context(settings) if self._https else None
        self._timeout = settings.timeout
        self._headers = {"content-type": "application/x-protobuf", "user-agent": USER_AGENT, **dict(settings.headers)}
        self._gzip = settings.gzip
        if self._gzip:
            self._headers["content-encoding"] = "gzip"
        self._connection: http.client.HTTPConnection | None = None

    def send(self, request: bytes) -> None:
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        if self._gzip:
            request = gzip.compress(request, compresslevel=5)  # zlib lets go of the GIL while it works
        for attempt in (1, 2):
            kept = self._connection is not None and self._connection.sock is not None
            try:
                status = self._post(request, deadline)
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.close()
                if not (kept and attempt == 1):  # a kept connection the collector closed while idle: once more
                    raise ExportError(_describe(exc)) from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise ExportError(_describe(exc)) from None
        if not 200 <= status < 300:
            raise ExportError(f"HTTP {status}")

    def _post(self, request: bytes, deadline: float | None) -> int:
        connection = self._connection
        if connection is None:
            if self._https:
                connection = http.client.HTTPSConnection(self._host, self._port, context=self._context)
            else:
                connection = http.client.HTTPConnection(self._host, self._port)
            self._connection = connection
        _budget(connection, deadline)
        connection.request("POST", self._target, request, self._headers)
        _budget(connection, deadline)
        answer = connection.getresponse()
        _budget(connection, deadline)
        body = answer.read(MAX_ANSWER + 1)
        if len(body) > MAX_ANSWER or not answer.isclosed():
            self.close()  # an answer too long to read is not worth the connection
        return answer.status

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _budget(connection: http.client.HTTPConnection, deadline: float | None) -> None:
    """Give the next blocking step what is left of the export's time."""
    if deadline is None:
        connection.timeout = None
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    connection.timeout = left
    if connection.sock is not None:
        connection.sock.settimeout(left)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
