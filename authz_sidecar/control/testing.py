"""``ctl test`` and ``ctl cases``: policy test cases run against a set offline, or through a real
Envoy so that the running sidecars, not only the engine, are checked; and the cases services
register next to their catalogs (the ones a controller's plan must pass).

Offline, every case is decided by the stored set compiled here; a failure names the grants and
roles behind the answer. Live (``--live URL``), each case is sent to Envoy as a request with the
principal's identity (a token from ``--tokens``, or a development header) and, for a shadow, the
tester header naming it: the principal must be one of the shadow's testers, or the active set
answers (the header is a testers' privilege). The live answer is compared with the offline one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authz_sidecar.control.rollouts import who
from authz_sidecar.documents import load_document
from authz_sidecar.documents.cases import parse_cases
from authz_sidecar.errors import AuthzError, ConfigError
from authz_sidecar.model.cases import Case, CaseResult, Cases, route_for, run_suites
from authz_sidecar.model.engine import compile_set
from authz_sidecar.model.routes import RouteTable
from authz_sidecar.model.values import Catalog, PermissionSet, RouteSpec
from authz_sidecar.store.cases import CaseStore
from authz_sidecar.store.policy import PolicyStore, StoreError

SHADOW_HEADER = "x-authz-shadow-version"


def read_cases(path: str) -> Cases:
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise AuthzError(f"--cases {path}: {exc.strerror}") from None
    return parse_cases(load_document(text, path), path)


def routes_of(catalogs: Iterable[Catalog]) -> dict[str, RouteTable]:
    return {c.service: RouteTable(c.routes) for c in catalogs}


def run_all(suites: Iterable[Cases], permissions: PermissionSet, catalogs: Iterable[Catalog]) -> list[CaseResult]:
    return run_suites(suites, permissions, compile_set(permissions), catalogs)


async def cmd_test(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    if ns.live and not (ns.tokens or ns.principal_header):
        raise ConfigError("--live needs --tokens FILE or --principal-header NAME: how each principal is identified")
    suites = [read_cases(ns.cases)] if ns.cases else (await CaseStore(store).all())[0]
    if not suites:
        raise StoreError("no cases: give --cases FILE, or register some with 'ctl cases put'")
    permissions = await store.permission_set(ns.version)
    catalogs = await store.catalogs()
    results = await asyncio.to_thread(run_all, suites, permissions, catalogs)
    problems = [
        f"case {r.case.name!r}: expected {'allow' if r.case.allow else 'deny'}, got "
        f"{'allow' if r.allowed else 'deny'}: {r.error or r.why}"
        for r in results
        if not r.passed
    ]
    report: dict[str, Any] = {
        "version": ns.version,
        "cases": len(results),
        "passed": sum(r.passed for r in results),
        "failed": len(problems),
        "results": [r.document() for r in results],
    }
    if ns.live:
        pointers = await store.pointers()
        header = None if ns.version == pointers.active else ns.version
        if header is not None:
            testers = pointers.shadow(ns.version).testers
            strangers = sorted({r.case.principal for r in results} - testers)
            if strangers:
                raise StoreError(
                    f"live cases run as testers of {ns.version}; not testers: {', '.join(strangers)} "
                    "(the active set would answer for them)"
                )
        run = LiveRun(
            url=ns.live,
            timeout=ns.timeout,
            principal_header=ns.principal_header,
            tokens=_tokens(ns.tokens) if ns.tokens else {},
            header=header,
            specs={c.service: c.routes for c in catalogs},
            tables=routes_of(catalogs),
            service_of={id(case): suite.service for suite in suites for case in suite.cases},
        )
        live = await asyncio.to_thread(run.send_all, results)
        report["live"] = live
        problems += [f"case {entry['case']!r} live: {entry['problem']}" for entry in live if entry.get("problem")]
    report["problems"] = problems
    return report


def _tokens(path: str) -> dict[str, str]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise AuthzError(f"--tokens {path}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise AuthzError(f"--tokens {path}: expected a JSON object of principal -> token")
    return data


@dataclass(frozen=True, slots=True)
class LiveRun:
    """Sending cases through Envoy: where, as whom, naming which shadow, resolved through which
    service's routes."""

    url: str
    timeout: float
    principal_header: str
    tokens: dict[str, str]
    header: str | None  # the shadow named in the tester header (None for the active set)
    specs: dict[str, tuple[RouteSpec, ...]]
    tables: dict[str, RouteTable]
    service_of: dict[int, str]  # id(case) -> its suite's service

    def send_all(self, results: list[CaseResult]) -> list[dict[str, Any]]:
        out = []
        for result in results:
            case = result.case
            service = self.service_of.get(id(case), "")
            table = self.tables.get(service)
            request = route_for(case, self.specs.get(service, ()), table) if table is not None else case.route
            entry: dict[str, Any] = {"case": case.name, "offline": "allow" if result.allowed else "deny"}
            if request is None:
                entry["skipped"] = "no route of the catalog asks this permission in this scope"
                out.append(entry)
                continue
            entry["request"] = f"{request[0]} {request[1]}"
            status = self.send(case, request)
            live = "allow" if 200 <= status < 300 else "deny" if status == 403 else None
            entry.update(status=status, live=live)
            if live is None:
                entry["problem"] = f"Envoy answered {status} (neither allowed nor forbidden: the identity?)"
            elif live != entry["offline"]:
                entry["problem"] = f"the sidecars answered {live}, the set offline {entry['offline']}"
            out.append(entry)
        return out

    def send(self, case: Case, request: tuple[str, str]) -> int:
        headers = {}
        if self.header is not None:
            headers[SHADOW_HEADER] = self.header
        if self.principal_header:
            headers[self.principal_header] = case.principal
        elif case.principal in self.tokens:
            headers["authorization"] = f"Bearer {self.tokens[case.principal]}"
        else:
            raise AuthzError(f"--tokens has no token for {case.principal!r} (case {case.name!r})")
        method, path = request
        req = urllib.request.Request(self.url.rstrip("/") + path, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:  # noqa: S310 - the operator's Envoy
                return int(response.status)
        except urllib.error.HTTPError as err:
            return int(err.code)
        except (urllib.error.URLError, OSError) as exc:
            raise AuthzError(f"--live {self.url}: {getattr(exc, 'reason', exc)}") from None


async def cmd_cases_put(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    cases = read_cases(ns.file)
    if ns.service and cases.service and ns.service != cases.service:
        raise ConfigError(f"--service {ns.service} but {ns.file} names service {cases.service}")
    service = ns.service or cases.service
    known = {c.service for c in await store.catalogs()}
    if service not in known:
        raise StoreError(f"service {service!r} has no registered catalog; register it first ('ctl registry put')")
    return await CaseStore(store).put(Cases(cases.cases, service), who(), ns.reason or f"cases of {service}")


async def cmd_cases_get(store: PolicyStore, ns: argparse.Namespace) -> dict[str, Any]:
    suites, broken = await CaseStore(store).all()
    shown = [s for s in suites if not ns.service or s.service == ns.service]
    return {
        "services": {s.service: [c.name for c in s.cases] for s in shown},
        "problems": [f"cases {key}: {why}" for key, why in broken.items()],
    }


def add_test_commands(
    commands: Any,
    command: Callable[..., argparse.ArgumentParser],
    connection: Callable[[argparse.ArgumentParser, bool], None],
) -> None:
    test = command("test", "run policy test cases against a set, offline or through Envoy", cmd_test)
    test.add_argument("version", help="the set (active, a shadow, or any stored version)")
    test.add_argument("--cases", default="", metavar="FILE", help="a cases file (default: the registered cases)")
    test.add_argument("--live", default="", metavar="ENVOY_URL", help="also send each case through this Envoy")
    test.add_argument("--tokens", default="", metavar="FILE", help="JSON: principal -> bearer token (for --live)")
    test.add_argument("--principal-header", default="", help="send the principal in this header instead (dev)")
    test.add_argument("--timeout", type=float, default=5.0, help="seconds per live request")
    cases = commands.add_parser("cases", help="the policy test cases services register")
    connection(cases, True)
    cases_commands = cases.add_subparsers(dest="cases_command", required=True, metavar="COMMAND")
    put = command("put", "register (replace) a service's cases (audited)", cmd_cases_put, cases_commands)
    put.add_argument("--file", required=True, help="the cases file")
    put.add_argument("--service", default="", help="the service (default: the file's)")
    put.add_argument("--reason", default="", help="why (audited)")
    get = command("get", "the registered cases, per service", cmd_cases_get, cases_commands)
    get.add_argument("--service", default="", help="only this service's")


def directory_cases(
    directory: Path, sets: Iterable[PermissionSet], catalogs: Iterable[Catalog]
) -> dict[str, list[CaseResult]]:
    """The cases of a policy directory run on each of its sets: ``cases/<version>.yaml`` for that
    set when there is one (a change's own expectations), else ``cases.yaml`` (everyone's); a set
    with neither has none. A cases file that does not parse is a DocumentError, as any file there."""
    shared = directory / "cases.yaml"
    catalogs = tuple(catalogs)
    found: dict[str, list[CaseResult]] = {}
    for permissions in sets:
        own = directory / "cases" / f"{permissions.version}.yaml"
        path = own if own.is_file() else shared if shared.is_file() else None
        if path is None:
            continue
        suite = parse_cases(load_document(path.read_bytes(), str(path)), str(path))
        if not suite.service and len(catalogs) == 1:
            suite = Cases(suite.cases, catalogs[0].service)  # a directory of one service: its routes
        found[permissions.version] = run_all([suite], permissions, catalogs)
    return found
