"""`authz-sidecar envoy-config`: Envoy's config generated from a catalog.

The generated configs are validated by a real Envoy (`envoy --mode validate`) in every shape the
generator has, and one of them fronts a real sidecar and upstream to show that what the generator
promises holds on the wire: the catalog's routes carry their permissions, the tester's header
stops at Envoy, a path Envoy would read differently from the sidecar is left to the sidecar, and
the sidecar can sit on a Unix socket.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_sidecar import cli
from authz_sidecar.deploy import envoyconfig
from authz_sidecar.deploy.envoyconfig import AuthzTarget, EnvoyConfigOptions, HostPort, JwtSettings
from authz_sidecar.documents import parse_catalog
from authz_sidecar.errors import ConfigError
from authz_sidecar.local import envoy
from authz_sidecar.local.processes import LOOPBACK, Process, free_port, wait_for_http, wait_for_port
from authz_sidecar.local.tokens import DEMO_ISSUER, DemoIssuer
from authz_sidecar.model.routes import RouteTable

from .helpers import CATALOG, shadow, write_policy

EXAMPLE_CATALOG = Path(__file__).resolve().parents[1] / "examples" / "policy" / "catalog.yaml"


def generate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["envoy-config", *args])
    out, err = capsys.readouterr()
    return code, out, err


def routes_of(config: dict[str, Any]) -> list[dict[str, Any]]:
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return manager["route_config"]["virtual_hosts"][0]["routes"]  # type: ignore[no-any-return]


# --- what the generator writes ----------------------------------------------------------------


def test_each_catalog_route_carries_its_permission_in_the_sidecars_order() -> None:
    catalog = parse_catalog(
        {
            **CATALOG,
            "routes": [
                {"method": "GET", "path": "/things/{id}", "permission": "things:view"},
                {"method": "GET", "path": "/things/new", "permission": "things:edit"},
                {"method": "GET", "path": "/things", "permission": "things:view", "scope": "tenant:main"},
                *CATALOG["routes"][2:],
            ],
        },
        "catalog",
    )
    config = yaml.safe_load(envoyconfig.render(catalog, EnvoyConfigOptions(upstream=HostPort("127.0.0.1", 1))))
    routes = routes_of(config)
    names = [r["name"] for r in routes]
    # Literal paths first, then templates with their literal segments first, as model/routes matches.
    assert names.index("GET /things/new") < names.index("GET /things/{id}")
    assert (
        names[-1] == "unmapped"
        and routes[-1]["match"] == {"prefix": "/"}
        and "typed_per_filter_config" not in routes[-1]
    )

    def extensions(name: str) -> dict[str, str] | None:
        route = next(r for r in routes if r["name"] == name)
        per_filter = route.get("typed_per_filter_config", {}).get("envoy.filters.http.ext_authz")
        return per_filter["check_settings"]["context_extensions"] if per_filter else None

    assert extensions("GET /things/{id}") == {"permission": "things:view"}
    assert extensions("GET /things") == {"permission": "things:view", "scope": "tenant:main"}
    # Envoy cannot fill account:{account}: the sidecar maps that route itself, scope and all.
    assert extensions("GET /accounts/{account}/things") is None


@pytest.mark.parametrize(
    ("template", "path", "matches"),
    [
        ("/things/{id}", "/things/42", True),
        ("/things/{id}", "/things/42/", True),
        ("/things/{id}", "/things/4%32", False),  # escaped: left to the sidecar's decoding
        ("/things/{id}", "/things/42/parts", False),
        ("/things", "/things", True),
        ("/things", "/things/", True),
        ("/things", "/thingsx", False),
        ("/a.b/{x}", "/aXb/1", False),  # a literal dot is a dot
        ("/", "/", True),
    ],
)
def test_path_regex_matches_what_the_route_table_matches(template: str, path: str, matches: bool) -> None:
    assert bool(re.fullmatch(envoyconfig.path_regex(template), path)) is matches
    if matches:  # whatever Envoy attaches a permission to, the sidecar would have mapped the same way
        spec = parse_catalog(
            {
                "service": "s",
                "permissions": [{"handle": "s:view"}],
                "routes": [{"method": "GET", "path": template, "permission": "s:view"}],
            },
            "c",
        ).routes
        assert RouteTable(spec).resolve("GET", path) is not None


def test_bad_flags_are_one_line_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cases = [
        (["--catalog", str(tmp_path / "missing.yaml"), "--upstream", "svc:80"], "--catalog"),
        (["--catalog", str(EXAMPLE_CATALOG), "--upstream", "svc"], "--upstream: 'svc' is not HOST:PORT"),
        (["--catalog", str(EXAMPLE_CATALOG), "--upstream", "svc:80", "--authz", "unix:relative"], "unix:///"),
        (["--catalog", str(EXAMPLE_CATALOG), "--upstream", "svc:80", "--jwks-file", "k.json"], "need --jwt-issuer"),
        (
            ["--catalog", str(EXAMPLE_CATALOG), "--upstream", "svc:80", "--jwt-issuer", "i"],
            "exactly one of --jwks-file and --jwks-uri",
        ),
        (
            ["--catalog", str(EXAMPLE_CATALOG), "--upstream", "svc:80", "--jwt-issuer", "i", "--jwks-uri", "ftp://x/k"],
            "not an http(s) URL",
        ),
        (["--catalog", str(EXAMPLE_CATALOG), "--upstream", "svc:80", "--authz-timeout-ms", "0"], "positive"),
    ]
    bad_catalog = tmp_path / "bad.yaml"
    bad_catalog.write_text("service: things\nroutes: [{method: GET, path: /x, permission: nope:view}]\n")
    cases.append((["--catalog", str(bad_catalog), "--upstream", "svc:80"], "nope:view"))
    for args, message in cases:
        code, out, err = generate(capsys, *args)
        assert code == 2, (args, err)
        assert out == ""
        assert err.count("\n") == 1 and message in err, (args, err)


def test_a_wrong_field_fails_at_generation_not_in_envoy() -> None:
    """The messages are Envoy's own types: a value of the wrong type is refused when built."""
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Cluster(name="x", connect_timeout="fast")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Cluster(nmae="x")  # type: ignore[call-arg]
    with pytest.raises(ConfigError):
        JwtSettings(issuer="i", jwks_file="a", jwks_uri="https://idp/keys")


# --- Envoy accepts every shape ----------------------------------------------------------------


@pytest.mark.envoy
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="defaults"),
        pytest.param(["--authz", "unix:///var/run/authz/authz.sock"], id="unix-socket"),
        pytest.param(["--authz", "10.0.0.1:9191,10.0.0.2:9191", "--otlp", "jaeger:4317"], id="balanced-traced"),
        pytest.param(
            ["--upstream", "things.default.svc.cluster.local:8081", "--authz", "authz-sidecar:9191"],
            id="dns-names",
        ),
        pytest.param(
            ["--jwt-issuer", "https://idp.example", "--jwks-uri", "https://idp.example/.well-known/jwks.json"],
            id="remote-jwks",
        ),
        pytest.param(["--jwt-issuer", DEMO_ISSUER, "--jwks-file", "JWKS", "--jwt-audience", "things"], id="local-jwks"),
        pytest.param(["--no-route-permissions"], id="sidecar-routes"),
    ],
)
def test_generated_configs_validate_with_envoy(
    extra: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    jwks = DemoIssuer().write_jwks(tmp_path / "jwks.json")
    args = [a.replace("JWKS", str(jwks)) for a in extra]
    if "--upstream" not in args:
        args += ["--upstream", "127.0.0.1:8081"]
    out = tmp_path / "envoy.yaml"
    code, _, err = generate(capsys, "--catalog", str(EXAMPLE_CATALOG), *args, "--out", str(out), "--validate")
    assert code == 0, err
    result = envoy.validate(out)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.envoy
def test_envoy_refusing_a_config_is_a_one_line_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = generate(
        capsys,
        "--catalog",
        str(EXAMPLE_CATALOG),
        "--upstream",
        "127.0.0.1:8081",
        "--jwt-issuer",
        "i",
        "--jwks-file",
        str(tmp_path / "absent.json"),
        "--validate",
    )
    assert code == 1 and out == ""
    assert err.startswith("authz-sidecar: envoy rejected the config:") and err.count("\n") == 1
    assert "absent.json" in err


# --- the generated config on the wire ---------------------------------------------------------


@dataclass
class Fronted:
    port: int
    issuer: DemoIssuer

    def get(self, path: str, principal: str | None, method: str = "GET", **headers: str) -> tuple[int, dict[str, Any]]:
        if principal is not None:
            headers["authorization"] = f"Bearer {self.issuer.token(principal)}"
        request = urllib.request.Request(f"http://{LOOPBACK}:{self.port}{path}", method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            raw = err.read()
            return err.code, json.loads(raw) if raw.startswith(b"{") else {}


@pytest.fixture(scope="module")
def fronted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fronted]:
    """upstream <- Envoy (generated from a catalog with one route more than the sidecar's) <- a
    sidecar on a Unix socket, deciding from a policy directory."""
    work = tmp_path_factory.mktemp("generated")
    policy = write_policy(
        work / "policy",
        shadows=[shadow("v2", testers=["qa-bot"], grants=[{"principal": "qa-bot", "roles": ["editor"]}])],
    )
    envoy_catalog = work / "envoy-catalog.yaml"
    envoy_catalog.write_text(
        yaml.safe_dump(
            {
                **CATALOG,
                "routes": [*CATALOG["routes"], {"method": "GET", "path": "/reports/{id}", "permission": "things:view"}],
            }
        )
    )
    issuer = DemoIssuer()
    jwks = issuer.write_jwks(work / "jwks.json")
    socket_path = work / "authz.sock"
    ports = {"envoy": free_port(), "admin": free_port(), "upstream": free_port(), "http": free_port()}
    processes: list[Process] = []
    try:
        upstream = Process(
            "upstream", [sys.executable, "-m", "authz_sidecar.local.upstream", "--port", str(ports["upstream"])], work
        )
        processes.append(upstream)
        sidecar = Process(
            "sidecar",
            [
                sys.executable, "-m", "authz_sidecar", "serve", "--policy-dir", str(policy),
                "--listen", f"unix://{socket_path}", "--http", f"{LOOPBACK}:{ports['http']}",
                "--service", "things", "--jwt-authn-payload-key", envoyconfig.JWT_PAYLOAD_KEY,
                "--cache-file", "off", "--grace", "0",
            ],
            work,
        )  # fmt: skip
        processes.append(sidecar)
        config = work / "envoy.yaml"
        options = EnvoyConfigOptions(
            upstream=HostPort(LOOPBACK, ports["upstream"]),
            listen=HostPort(LOOPBACK, ports["envoy"]),
            admin=HostPort(LOOPBACK, ports["admin"]),
            authz=(AuthzTarget.parse(f"unix://{socket_path}"),),
            jwt=JwtSettings(issuer=DEMO_ISSUER, jwks_file=str(jwks)),
        )
        text = envoyconfig.render(parse_catalog(yaml.safe_load(envoy_catalog.read_text()), "c"), options)
        config.write_text(text)
        wait_for_port(ports["upstream"], upstream)
        wait_for_http(f"http://{LOOPBACK}:{ports['http']}/readyz", sidecar)
        proxy = envoy.start(config, work)
        processes.append(proxy)
        wait_for_http(f"http://{LOOPBACK}:{ports['admin']}/ready", proxy)
        yield Fronted(ports["envoy"], issuer)
    finally:
        for process in reversed(processes):
            process.stop()


@pytest.mark.envoy
def test_allowed_and_denied_through_the_unix_socket(fronted: Fronted) -> None:
    assert fronted.get("/things/1", "bob")[0] == 200
    assert fronted.get("/things/1", "bob", method="PUT")[0] == 403
    assert fronted.get("/things/1", None)[0] == 401
    assert fronted.get("/nowhere", "alice")[0] == 403  # unmapped: the last route, the sidecar's refusal


@pytest.mark.envoy
def test_the_route_carries_its_permission_to_the_sidecar(fronted: Fronted) -> None:
    """/reports/{id} is in the catalog Envoy was generated from, not in the sidecar's: only the
    permission Envoy sends with the route can allow it."""
    status, body = fronted.get("/reports/7", "bob")
    assert status == 200, body
    assert fronted.get("/reports/7", "nobody")[0] == 403


@pytest.mark.envoy
def test_a_scope_template_is_filled_by_the_sidecar(fronted: Fronted) -> None:
    assert fronted.get("/accounts/acme/things", "carol")[0] == 200
    assert fronted.get("/accounts/globex/things", "carol")[0] == 403


@pytest.mark.envoy
def test_the_testers_header_decides_but_never_reaches_the_service(fronted: Fronted) -> None:
    status, body = fronted.get("/things/1", "qa-bot", method="PUT", **{"x-authz-shadow-version": "v2"})
    assert status == 200 and body["set_version"] == "v2", body
    assert body["shadow_header"] is None


@pytest.mark.envoy
def test_an_escaped_path_is_left_to_the_sidecar(fronted: Fronted) -> None:
    """Envoy does not attach /things/{id}'s permission to /things/4%32; the sidecar decodes it,
    maps it with its own table and decides; an escaped slash is refused before anyone decides."""
    status, body = fronted.get("/things/4%32", "bob")
    assert status == 200, body
    assert fronted.get("/things/4%32", "bob", method="PUT")[0] == 403
    assert fronted.get("/things/a%2Fb", "alice")[0] == 400


def test_the_generator_is_importable_only_where_it_is_used() -> None:
    """`serve` never loads Envoy's API: its import is paid by envoy-config alone."""
    probe = "import sys, authz_sidecar.cli, authz_sidecar.server; print('envoy_data_plane' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
