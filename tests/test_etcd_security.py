"""etcd over TLS with client certificates, and with user/password auth: configured the way an
operator would, on the command line and in the environment, for the sidecar process and ctl."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.request
from pathlib import Path

from etcd3aio.auth import AuthService

from authz_sidecar.local.etcd import EtcdCluster, ServerTls
from authz_sidecar.local.processes import LOOPBACK, Process, free_port, wait_for_http
from authz_sidecar.store.etcd import Etcd, EtcdOptions

from .certs import make_certs
from .helpers import ACTIVE, CATALOG, ctl, unique_prefix, wait_for, write_json


def sidecar_process(tmp: Path, args: list[str], env: dict[str, str] | None = None) -> tuple[Process, int]:
    http_port = free_port()
    argv = [
        sys.executable, "-m", "authz_sidecar", "serve", *args,
        "--service", "things", "--listen", f"{LOOPBACK}:{free_port()}", "--http", f"{LOOPBACK}:{http_port}",
        "--cache-file", "off",
    ]  # fmt: skip
    return Process("sidecar", argv, tmp, env=env), http_port


def status(port: int) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/status", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def test_tls_with_client_certificates_from_the_command_line(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    cluster = EtcdCluster(tmp_path / "etcd", tls=ServerTls(certs["ca"], certs["server_cert"], certs["server_key"]))
    sidecar = None
    try:
        cluster.start()
        prefix = unique_prefix()
        tls = ["--etcd-ca", str(certs["ca"]), "--etcd-cert", str(certs["client_cert"])]
        tls += ["--etcd-key", str(certs["client_key"])]
        catalog = write_json(tmp_path / "catalog.json", CATALOG)
        assert ctl(cluster.endpoints, prefix, "registry", "put", "--file", catalog, *tls) == 0
        assert ctl(cluster.endpoints, prefix, "init", "--file", write_json(tmp_path / "a.json", ACTIVE), *tls) == 0
        # Without a client certificate etcd refuses, and ctl says so on one line.
        assert ctl(cluster.endpoints, prefix, "status", "--etcd-ca", str(certs["ca"])) == 1
        sidecar, port = sidecar_process(tmp_path, ["--etcd", cluster.endpoints, "--prefix", prefix, *tls])
        wait_for_http(f"http://{LOOPBACK}:{port}/readyz", sidecar, timeout=30)
        assert status(port)["active_version"] == "v1"
    finally:
        if sidecar is not None:
            sidecar.stop()
        cluster.stop()


def _enable_auth(endpoint: str, password: str) -> None:
    async def enable() -> None:
        async with Etcd(EtcdOptions(endpoints=(endpoint,))) as etcd:
            auth = AuthService(etcd._channel)
            await auth.role_add("root")
            await auth.user_add("root", password)
            await auth.user_grant_role("root", "root")
            await auth.auth_enable()

    asyncio.run(enable())


def test_user_and_password_from_the_environment(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "etcd")
    processes: list[Process] = []
    try:
        cluster.start()
        _enable_auth(cluster.endpoints, "s3cret")
        prefix = unique_prefix()
        os.environ.update(AUTHZ_ETCD_USER="root", AUTHZ_ETCD_PASSWORD="s3cret")  # read by ctl's flags
        try:
            catalog = write_json(tmp_path / "catalog.json", CATALOG)
            assert ctl(cluster.endpoints, prefix, "registry", "put", "--file", catalog) == 0
            assert ctl(cluster.endpoints, prefix, "init", "--file", write_json(tmp_path / "a.json", ACTIVE)) == 0
        finally:
            del os.environ["AUTHZ_ETCD_USER"], os.environ["AUTHZ_ETCD_PASSWORD"]
        assert ctl(cluster.endpoints, prefix, "status") == 1  # no credentials: refused
        args = ["--etcd", cluster.endpoints, "--prefix", prefix]
        good, good_port = sidecar_process(
            tmp_path, args, env={"AUTHZ_ETCD_USER": "root", "AUTHZ_ETCD_PASSWORD": "s3cret"}
        )
        processes.append(good)
        wait_for_http(f"http://{LOOPBACK}:{good_port}/readyz", good, timeout=30)
        assert status(good_port)["active_version"] == "v1"
        (tmp_path / "bad").mkdir()
        bad, bad_port = sidecar_process(
            tmp_path / "bad", args, env={"AUTHZ_ETCD_USER": "root", "AUTHZ_ETCD_PASSWORD": "wrong"}
        )
        processes.append(bad)
        wait_for(lambda: _up(bad_port), what="the sidecar with the wrong password to answer /status")
        assert status(bad_port)["ready"] is False  # fails closed: no snapshot, every Check denied
    finally:
        for process in processes:
            process.stop()
        cluster.stop()


def _up(port: int) -> bool:
    try:
        status(port)
    except OSError:
        return False
    return True
