"""Keep the bearer-token verifier's keys current, off the request path.

Two sources, each a task owned by the sidecar's lifecycle (started with it, cancelled on stop):

- :class:`JwksFile` (``--jwks-file``): read once at start (an unreadable or invalid file is a
  configuration error then), then polled by inode, size and mtime every ``--poll-interval``; a
  changed file is reloaded.
- :class:`JwksUrl` (``--jwks-url``): fetched in a worker thread at start, then every
  ``--jwks-refresh-interval`` seconds, or sooner when the response's ``Cache-Control: max-age`` says
  the keys are fresh for less time. A token naming a key the set lacks asks for an early refresh
  (a rotation published since the last fetch): at once for the first, then at most once per
  ``--jwks-min-refresh-interval`` however many such tokens arrive, so a flood of made-up kids
  cannot hammer the identity provider. Scheduled fetches and retries after a failure are never
  closer together than that interval either.

Rules both follow: a request never waits for a fetch or a read; keys are replaced whole, only by a
set that parsed and holds at least one usable signing key; a failure (HTTP error, timeout, a body
that is not JSON, an empty key set, a missing file) keeps the last good keys and is logged and shown
in ``/status``. Before the first good set (a URL not fetched yet), every bearer token is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

import structlog

from authz_sidecar import __version__
from authz_sidecar.decision.tokens import KeySet, TokenVerifier
from authz_sidecar.errors import ConfigError

log = structlog.get_logger("authz_sidecar.decision.jwks")

# A JWKS is a few kilobytes; an identity provider answering more is misbehaving, not rotating.
MAX_JWKS_BYTES = 1 << 20
# Retries after failures back off to this, unless --jwks-refresh-interval is shorter.
MAX_RETRY_SECONDS = 60.0


def max_age(cache_control: str) -> float | None:
    """Seconds the response says it stays fresh: ``max-age=N``; ``no-cache``/``no-store`` are 0.
    Anything else (absent, malformed) is None: the refresh interval applies."""
    directives = [d.strip().lower() for d in cache_control.split(",")]
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    for directive in directives:
        name, _, value = directive.partition("=")
        value = value.strip().strip('"')
        if name.strip() == "max-age" and value.isascii() and value.isdigit():
            return float(value)
    return None


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; keys come over HTTP(S) only."""

    def redirect_request(  # noqa: PLR0917 - urllib's signature
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to {newurl!r} refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


class _KeySource:
    """What both sources report in /status, and how they install a set."""

    failed_event = "jwks_fetch_failed"

    def __init__(self, verifier: TokenVerifier, source: str) -> None:
        self.verifier = verifier
        self.source = source
        self.loaded_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def _installed(self, keyset: KeySet) -> None:
        previous = self.verifier.keyset
        self.verifier.install(keyset)
        self.loaded_at = time.time()
        self.last_error = self.last_error_at = None
        for skipped in keyset.skipped:
            log.warning("jwks_key_skipped", source=self.source, key=skipped)
        if previous is None or previous.kids() != keyset.kids():
            log.info("jwks_loaded", source=self.source, kids=keyset.kids())

    def _failed(self, error: str, **fields: Any) -> None:
        """Record a failure; log it when it is news (a poll every half second must not flood the log)."""
        news = error != self.last_error
        self.last_error, self.last_error_at = error, time.time()
        keyset = self.verifier.keyset
        if not news:
            return
        if keyset is None:
            log.error(
                self.failed_event,
                source=self.source,
                error=error,
                consequence="bearer tokens are denied until the first key set is fetched",
                **fields,
            )
        else:
            log.warning(
                self.failed_event,
                source=self.source,
                error=error,
                consequence=f"keeping the last good keys {keyset.kids()}",
                **fields,
            )

    def status(self) -> dict[str, Any]:
        keyset = self.verifier.keyset
        return {
            "source": self.source,
            "loaded": keyset is not None,
            "keys": keyset.kids() if keyset is not None else [],
            "skipped": list(keyset.skipped) if keyset is not None else [],
            "loaded_at": self.loaded_at,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


class JwksFile(_KeySource):
    failed_event = "jwks_reload_failed"

    def __init__(self, path: Path, verifier: TokenVerifier, *, interval: float) -> None:
        super().__init__(verifier, str(path))
        self.path = path
        self.interval = interval
        self._seen = self._fingerprint()
        self._installed(KeySet.from_file(path))  # at start, a bad file is a configuration error

    def _fingerprint(self) -> tuple[int, int, int] | str:
        try:
            st = self.path.stat()
        except OSError as exc:
            return f"--jwks-file {self.path}: {exc.strerror}"
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _poll(self) -> KeySet | str | None:
        """A new key set, an error to report, or None when there is nothing new."""
        current = self._fingerprint()
        # A file that failed is read again on every poll: a half-written file may be completed within
        # the same mtime tick and size.
        if current == self._seen and self.last_error is None:
            return None
        self._seen = current
        if isinstance(current, str):
            return current
        try:
            return KeySet.from_file(self.path)
        except ConfigError as exc:
            return str(exc)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            result = await asyncio.to_thread(self._poll)
            if isinstance(result, KeySet):
                self._installed(result)
            elif result is not None:
                self._failed(result)


class JwksUrl(_KeySource):
    def __init__(
        self,
        url: str,
        verifier: TokenVerifier,
        *,
        refresh_interval: float,
        min_interval: float,
        timeout: float,
    ) -> None:
        super().__init__(verifier, url)
        self.url = url
        self.refresh_interval = refresh_interval
        self.min_interval = min_interval
        self.timeout = timeout
        self.fetches = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._asked_at = float("-inf")
        verifier.on_unknown_kid = self.request_refresh

    def request_refresh(self) -> None:
        """Ask for an early refresh. Called on request threads: never blocks, and most calls (a flood
        of unknown kids) return after one comparison."""
        now = time.monotonic()
        loop, wake = self._loop, self._wake
        if now - self._asked_at < self.min_interval or loop is None or wake is None:
            return
        self._asked_at = now
        with contextlib.suppress(RuntimeError):  # the loop closed while the sidecar stops
            loop.call_soon_threadsafe(wake.set)

    def _fetch(self) -> tuple[KeySet, float | None]:
        """Runs in a worker thread. The whole fetch (not only each socket read) ends by the timeout."""
        # S310: the scheme is http or https (config.validate), and so are redirects (_HttpOnlyRedirects).
        request = urllib.request.Request(  # noqa: S310
            self.url, headers={"accept": "application/json", "user-agent": f"authz-sidecar/{__version__}"}
        )
        deadline = time.monotonic() + self.timeout
        where = f"--jwks-url {self.source}"
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                chunks: list[bytes] = []
                size = 0
                while chunk := response.read1(65536):
                    size += len(chunk)
                    if size > MAX_JWKS_BYTES:
                        raise ConfigError(f"{where}: answer larger than {MAX_JWKS_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise ConfigError(f"{where}: answer not complete within {self.timeout:g} s")
                    chunks.append(chunk)
                cache_control = response.headers.get("cache-control", "")
        except urllib.error.HTTPError as exc:
            raise ConfigError(f"{where}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise ConfigError(f"{where}: {exc.reason}") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise ConfigError(f"{where}: {exc or type(exc).__name__}") from None
        try:
            data = json.loads(b"".join(chunks))
        except ValueError as exc:
            raise ConfigError(f"{where}: not JSON ({exc})") from None
        return KeySet.parse(data, where), max_age(cache_control)

    def _next_delay(self, fresh_for: float | None, failures: int) -> float:
        if failures:
            delay = min(self.refresh_interval, MAX_RETRY_SECONDS, 2.0 ** (failures - 1))
        elif fresh_for is not None:
            delay = min(self.refresh_interval, fresh_for)
        else:
            delay = self.refresh_interval
        return max(self.min_interval, delay)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = wake = asyncio.Event()
        failures = 0
        while True:
            wake.clear()  # a request asking while this fetch runs is answered by the next one
            self.fetches += 1
            fresh_for: float | None = None
            try:
                keyset, fresh_for = await asyncio.to_thread(self._fetch)
            # Anything else is a bug; the refresher must outlive it, or the keys would silently age.
            except Exception as exc:
                failures += 1
                delay = self._next_delay(None, failures)
                error = str(exc) if isinstance(exc, ConfigError) else f"--jwks-url {self.source}: {exc!r}"
                self._failed(error, retry_in_seconds=round(delay, 3))
            else:
                failures = 0
                delay = self._next_delay(fresh_for, 0)
                self._installed(keyset)
            # Woken early only by request_refresh, which lets one request through per min interval.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)

    def status(self) -> dict[str, Any]:
        return {**super().status(), "fetches": self.fetches}
