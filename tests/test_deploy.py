"""deploy/: the generated Envoy configs are current and Envoy accepts them, the compose file is
valid and wired the way its Envoy configs say, the Kubernetes manifests pass the Kubernetes schemas,
and the pod's Envoy and sidecar really do meet on a Unix socket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from authz_sidecar import cli
from authz_sidecar.config import Settings
from authz_sidecar.local import envoy, upstream
from authz_sidecar.local.etcd import EtcdCluster
from authz_sidecar.local.processes import LOOPBACK, Process, free_port, wait_for_http
from authz_sidecar.local.tokens import DEMO_ISSUER, DemoIssuer

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
REGIONS = ("us-east", "eu-west")
SOCKET = "/var/run/authz/authz.sock"
# The oldest Kubernetes the manifests are written for (lifecycle.preStop.sleep is on by default
# from 1.30), and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _envoy_configs() -> dict[str, str]:
    """Every Envoy config under deploy/: compose's files, and the ones inside the k8s ConfigMaps."""
    configs = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((DEPLOY / "envoy").glob("*.yaml"))}
    for path in sorted((K8S / "regions").glob("*/envoy-config.yaml")):
        (config_map,) = _load_all(path)
        configs[str(path.relative_to(ROOT))] = config_map["data"]["envoy.yaml"]
    return configs


ENVOY_CONFIGS = _envoy_configs()


def _clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def _addresses(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        lb["endpoint"]["address"]
        for locality in cluster["load_assignment"]["endpoints"]
        for lb in locality["lb_endpoints"]
    ]


def _http_filters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return {f["name"]: f["typed_config"] for f in manager["http_filters"]}


def _jwks_file(config: dict[str, Any]) -> str:
    providers = _http_filters(config)["envoy.filters.http.jwt_authn"]["providers"]
    return str(providers["idp"]["local_jwks"]["filename"])


# --- the generated files ---------------------------------------------------------------------------


def test_generated_files_are_current() -> None:
    """A catalog (or tools/gen_deploy.py) changed without `make deploy-configs` fails here."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_deploy.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(ENVOY_CONFIGS) == sorted(
        [f"deploy/envoy/{r}.yaml" for r in REGIONS] + [f"deploy/k8s/regions/{r}/envoy-config.yaml" for r in REGIONS]
    )


@pytest.mark.envoy
@pytest.mark.parametrize("name", sorted(ENVOY_CONFIGS))
def test_envoy_accepts_the_config(name: str, tmp_path: Path) -> None:
    """`envoy --mode validate` on each config. Validation resolves no DNS, so the compose and
    Kubernetes service names (STRICT_DNS clusters) pass as they are; the JWKS file must exist, so a
    copy points at a real one."""
    text = ENVOY_CONFIGS[name]
    jwks = DemoIssuer().write_jwks(tmp_path / "jwks.json")
    copy = tmp_path / "envoy.yaml"
    copy.write_text(text.replace(_jwks_file(yaml.safe_load(text)), str(jwks)))
    result = envoy.validate(copy)
    assert result.returncode == 0, result.stdout + result.stderr


# --- docker compose ---------------------------------------------------------------------------------


def test_compose_file_is_valid() -> None:
    """`docker-compose config -q` (Debian's package, installed by `make test-deps`; no engine)."""
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("docker-compose is missing; `make test-deps` installs Debian's docker-compose")
        pytest.skip("docker-compose is not installed (make test-deps installs it): compose file not validated")
    result = subprocess.run(
        [exe, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)


def test_compose_services_are_wired_as_the_envoy_configs_say() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    init_mounts = {m.split(":")[1]: m.split(":")[0] for m in services["init"]["volumes"]}
    for region in REGIONS:
        config = yaml.safe_load(ENVOY_CONFIGS[f"deploy/envoy/{region}.yaml"])
        clusters = _clusters(config)
        (authz,) = _addresses(clusters["authz_sidecar"])
        (service,) = _addresses(clusters["service"])
        sidecar, things, proxy = (services[f"{kind}-{region}"] for kind in ("sidecar", "things", "envoy"))
        assert authz["socket_address"] == {"address": f"sidecar-{region}", "port_value": 9191}
        flags = _flags(sidecar["command"])
        assert flags["listen"] == "0.0.0.0:9191"
        assert flags["region"] == region
        assert flags["etcd"] == "etcd:2379"  # host:port: the client takes no URL scheme
        assert flags["jwt-authn-payload-key"] == "jwt_payload"
        assert sidecar["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        assert service["socket_address"] == {"address": f"things-{region}", "port_value": 8081}
        assert things["command"] == ["--host", "0.0.0.0", "--port", "8081"]  # noqa: S104 - its container's address
        assert _addresses(clusters["otel_collector"])[0]["socket_address"]["address"] == "jaeger"
        # Envoy's config is the generated file, and its JWKS is where init writes it.
        assert f"./envoy/{region}.yaml:/etc/envoy/envoy.yaml:ro" in proxy["volumes"]
        jwks_dir = str(Path(_jwks_file(config)).parent)
        assert f"demo:{jwks_dir}:ro" in proxy["volumes"]
        assert init_mounts[jwks_dir] == "demo"
        assert proxy["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert [p for s in services.values() for p in s.get("ports", [])] == [
        "127.0.0.1:2379:2379",
        "127.0.0.1:16686:16686",
        "127.0.0.1:9464:9464",
        "127.0.0.1:8080:8080",
        "127.0.0.1:9474:9464",
        "127.0.0.1:8090:8080",
    ]
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image ({image})"
        if image.startswith("authz-sidecar"):
            assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}


def test_compose_init_seeds_etcd_and_can_run_again(etcd: EtcdCluster, tmp_path: Path) -> None:
    """deploy/compose/init.sh, as the init container runs it (twice: every `docker compose up` does),
    against a real etcd: the second run changes nothing and fails nothing."""
    demo = tmp_path / "demo"
    demo.mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "AUTHZ_ETCD": etcd.endpoints,
        "AUTHZ_PREFIX": "/compose-init",
        "DEMO_DIR": str(demo),
        "POLICY_DIR": str(ROOT / "examples" / "policy"),
    }
    script = str(DEPLOY / "compose" / "init.sh")
    first = subprocess.run(["sh", script], env=env, capture_output=True, text=True, check=False, timeout=60)  # noqa: S607
    assert first.returncode == 0, first.stdout + first.stderr
    jwks = (demo / "jwks.json").read_text()
    second = subprocess.run(["sh", script], env=env, capture_output=True, text=True, check=False, timeout=60)  # noqa: S607
    assert second.returncode == 0, second.stdout + second.stderr
    assert "etcd already holds an active set" in second.stdout
    assert "repeated: True" in second.stdout
    assert (demo / "jwks.json").read_text() == jwks  # the Envoys still running hold this one
    status = subprocess.run(
        [str(Path(sys.executable).parent / "authz-sidecar"), "ctl", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    state = json.loads(status.stdout)
    assert state["active"] == "v1"
    assert list(state["shadows"]) == ["v2"]
    assert state["audit_head"]["seq"] == 2  # init and propose, once each
    assert set(state["catalogs"]) == {"things"}


# --- Kubernetes -------------------------------------------------------------------------------------


def _kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def test_every_manifest_is_in_the_kustomization() -> None:
    reached: set[Path] = set()

    def walk(directory: Path) -> None:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for resource in kustomization["resources"]:
            path = (directory / resource).resolve()
            if path.is_dir():
                walk(path)
            else:
                assert path.is_file(), f"{directory}: {resource} does not exist"
                reached.add(path)

    walk(K8S)
    assert reached == {p.resolve() for p in _manifests()}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_pass_the_kubernetes_schemas(version: str) -> None:
    documents = [(path, d) for path in _manifests() for d in _load_all(path)]
    assert {d["kind"] for _, d in documents} == {"ConfigMap", "Secret", "Deployment", "Service"}
    for path, document in documents:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(ROOT)}: {document['kind']} {document['metadata']['name']}: {exc}")


def test_schema_validation_catches_a_misspelt_field() -> None:
    (deployment,) = _load_all(K8S / "things" / "deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def _containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def test_pod_wiring_matches_the_envoy_config() -> None:
    (deployment,) = _load_all(K8S / "things" / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    containers = _containers(pod)
    volumes = {v["name"]: v for v in pod["volumes"]}
    sidecar, proxy = containers["sidecar"], containers["envoy"]
    flags = _flags(sidecar["args"])
    for region in REGIONS:
        config = yaml.safe_load(ENVOY_CONFIGS[f"deploy/k8s/regions/{region}/envoy-config.yaml"])
        clusters = _clusters(config)
        assert _addresses(clusters["authz_sidecar"]) == [{"pipe": {"path": SOCKET}}]
        assert _addresses(clusters["service"])[0]["socket_address"] == {"address": "127.0.0.1", "port_value": 8081}
        jwks_dir = str(Path(_jwks_file(config)).parent)
        assert _mounts(proxy)[jwks_dir] == "jwks" == _mounts(containers["demo-jwks"])[jwks_dir]
    # Envoy and the sidecar share the socket's directory, an emptyDir.
    assert flags["listen"] == f"unix://{SOCKET}"
    socket_dir = str(Path(SOCKET).parent)
    assert _mounts(sidecar)[socket_dir] == _mounts(proxy)[socket_dir] == "authz-socket"
    assert "emptyDir" in volumes["authz-socket"]
    assert _mounts(proxy)["/etc/envoy"] == "envoy" and volumes["envoy"]["configMap"]["name"] == "envoy"
    assert containers["things"]["args"] == ["--host", "127.0.0.1", "--port", "8081"]
    # The catalog the sidecar registers is the generated ConfigMap's.
    catalog = Path(flags["catalog"])
    assert _mounts(sidecar)[str(catalog.parent)] == "catalog"
    (catalog_map,) = _load_all(K8S / "catalog.yaml")
    assert volumes["catalog"]["configMap"]["name"] == catalog_map["metadata"]["name"]
    assert catalog.name in catalog_map["data"]
    # Probes on the ops HTTP port (gRPC is on the socket only, out of the kubelet's reach).
    ops = next(p for p in sidecar["ports"] if p["name"] == "ops")
    assert flags["http"] == f"0.0.0.0:{ops['containerPort']}"
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert {e["configMapRef" if "configMapRef" in e else "secretRef"]["name"] for e in sidecar["envFrom"]} == {
        "authz-environment",
        "authz-etcd-credentials",
    }
    # Non-root, read-only root filesystems, requests everywhere.
    assert pod["securityContext"]["runAsNonRoot"] is True
    for name, container in containers.items():
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["allowPrivilegeEscalation"] is False, name
        assert container["resources"]["requests"], name


def test_pod_settings_parse_as_the_sidecar_and_controller_read_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pods' arguments and environment (the ConfigMap, the Secret as shipped, empty: no etcd
    auth, no TLS), read by the sidecar's and the controller's own flag parsing."""
    config_map, secret = _load_all(K8S / "environment.yaml")
    for name, value in {**config_map["data"], **secret["stringData"], "AUTHZ_REGION": "us-east"}.items():
        monkeypatch.setenv(name, value)
    (deployment,) = _load_all(K8S / "things" / "deployment.yaml")
    args = _containers(deployment["spec"]["template"]["spec"])["sidecar"]["args"]
    catalog = str(ROOT / "examples" / "policy" / "catalog.yaml")  # the ConfigMap's file, where it is here
    flags = _flags(args) | {"catalog": catalog}
    ns = cli._build_parser().parse_args(["serve", *(f"--{k}={v}" for k, v in flags.items())])
    settings = cli.settings_from(ns)
    assert settings.etcd == ("etcd-0.etcd:2379", "etcd-1.etcd:2379", "etcd-2.etcd:2379")
    assert (settings.prefix, settings.region, settings.listen) == ("/authz", "us-east", f"unix://{SOCKET}")
    options = settings.etcd_options().validate()
    assert (options.user, options.password, options.ca_file) == ("", "", None)

    (controller,) = _load_all(K8S / "controller.yaml")
    (container,) = controller["spec"]["template"]["spec"]["containers"]
    ns = cli._build_parser().parse_args([*container["command"][1:], *container["args"]])
    assert Settings(**cli._etcd_settings(ns)).etcd_options().validate().endpoints == settings.etcd
    assert ns.metrics == "0.0.0.0:9465"


def test_controller_runs_two_replicas() -> None:
    (deployment,) = _load_all(K8S / "controller.yaml")
    assert deployment["spec"]["replicas"] == 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["authz-sidecar", "controller"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_kustomize_builds_both_regions() -> None:
    """`kubectl kustomize` (offline), when kubectl is installed: each region's names, labels and
    region, and the whole build through the schemas."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays are not built (each manifest is still validated)")
    built = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=False, timeout=60)
    assert built.returncode == 0, built.stderr
    documents = [d for d in yaml.safe_load_all(built.stdout) if d]
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSIONS[0], strict=True)
    named = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    for region in REGIONS:
        deployment = named["Deployment", f"things-{region}"]
        service = named["Service", f"things-{region}"]
        assert ("ConfigMap", f"envoy-{region}") in named
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector["authz-sidecar/region"] == region == service["spec"]["selector"]["authz-sidecar/region"]
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["envoy"]["configMap"]["name"] == f"envoy-{region}"
        assert volumes["catalog"]["configMap"]["name"] == "things-catalog"
        env = {e["name"]: e.get("value") for e in _containers(pod)["sidecar"]["env"]}
        assert env["AUTHZ_REGION"] == region
        assert all(c["image"] != "authz-sidecar" for c in _containers(pod).values())  # the images entry applied
    assert named["Deployment", "authz-controller"]["spec"]["replicas"] == 2


# --- the pod's Envoy and sidecar, for real -----------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket's path is limited to about 100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="authz-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _request(port: int, path: str, token: str | None = None, method: str = "GET") -> tuple[int, dict[str, Any]]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"http://{LOOPBACK}:{port}{path}", method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.envoy
def test_pod_envoy_and_sidecar_meet_on_a_unix_socket(short_dir: Path) -> None:
    """The Kubernetes pod's generated Envoy config, run for real with the sidecar listening on a Unix
    socket (the file source here instead of etcd): only the socket's directory, the ports and the
    JWKS file are moved to where this machine has them."""
    issuer = DemoIssuer()
    jwks = issuer.write_jwks(short_dir / "jwks.json")
    sock = short_dir / "authz.sock"
    text = ENVOY_CONFIGS["deploy/k8s/regions/us-east/envoy-config.yaml"]
    config = yaml.safe_load(text.replace(SOCKET, str(sock)).replace(_jwks_file(yaml.safe_load(text)), str(jwks)))
    listen, admin, service_port, collector = free_port(), free_port(), free_port(), free_port()
    config["static_resources"]["listeners"][0]["address"]["socket_address"] = {
        "address": LOOPBACK,
        "port_value": listen,
    }
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    clusters = _clusters(config)
    _addresses(clusters["service"])[0]["socket_address"]["port_value"] = service_port
    # No collector runs here; an address that answers nothing keeps DNS out of the test.
    _addresses(clusters["otel_collector"])[0]["socket_address"] = {"address": LOOPBACK, "port_value": collector}
    path = short_dir / "envoy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    service = upstream.make_server(LOOPBACK, service_port)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    ops = free_port()
    sidecar = Process(
        "sidecar",
        [
            sys.executable,
            "-m",
            "authz_sidecar",
            "serve",
            f"--listen=unix://{sock}",
            f"--http={LOOPBACK}:{ops}",
            f"--policy-dir={ROOT / 'examples' / 'policy'}",
            "--service=things",
            "--region=us-east",
            "--jwt-authn-payload-key=jwt_payload",
            "--grace=0",
        ],
        short_dir,
    )
    proxy: Process | None = None
    try:
        wait_for_http(f"http://{LOOPBACK}:{ops}/readyz", sidecar)
        assert sock.is_socket()
        proxy = envoy.start(path, short_dir)
        wait_for_http(f"http://{LOOPBACK}:{admin}/ready", proxy)
        status, body = _request(listen, "/things/42", issuer.token("alice"))
        assert (status, body["decided_by"], body["set_version"]) == (200, "active", "v1")
        assert _request(listen, "/things/42", issuer.token("dave"), method="PUT")[0] == 403
        assert _request(listen, "/things/42")[0] == 401
        assert issuer.issuer == DEMO_ISSUER
    finally:
        if proxy is not None:
            proxy.stop()
        sidecar.stop()
        service.shutdown()
        service.server_close()
