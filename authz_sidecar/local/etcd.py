"""Real etcd members on loopback: one for ``make run`` and most tests, three for the cluster tests;
and etcd's own gRPC proxy in front of them, the way a fleet of sidecars reaches one cluster.

Each member gets free client and peer ports and its own data directory, and can be killed,
restarted on the same data (it keeps its revisions), paused with SIGSTOP, which is what a hung
machine looks like to a client: the TCP connection stays open and nothing answers, or wiped and
started again as a new etcd on the same port (what a restore from an old backup, or a replaced
cluster, looks like to a client: revisions start again, and with another cluster token the
cluster id changes too).
"""

from __future__ import annotations

import os
import shutil
import signal
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from authz_sidecar.local.processes import LOOPBACK, Process, binary, free_port, wait_for_http, wait_for_port

# Not a secret: etcd derives member and cluster ids from it (with names and peer URLs).
CLUSTER_TOKEN = "authz-sidecar-local"  # noqa: S105


@dataclass(frozen=True)
class ServerTls:
    """Serve clients over TLS and require a client certificate signed by `ca`."""

    ca: Path
    cert: Path
    key: Path


class EtcdMember:
    def __init__(
        self,
        name: str,
        data_dir: Path,
        log_dir: Path,
        *,
        client_port: int = 0,
        peer_port: int = 0,
        tls: ServerTls | None = None,
        cluster_token: str = CLUSTER_TOKEN,
        flags: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.flags = tuple(flags)
        self.tls = tls
        # With the member's name and peer URL this fixes the member and cluster ids: a wiped member
        # started again with the same token is a new etcd with the same cluster id.
        self.cluster_token = cluster_token
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.process: Process | None = None

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.client_port}"

    @property
    def metrics_url(self) -> str:
        """etcd serves Prometheus text on its client URL (over TLS when clients need a certificate)."""
        return f"{'https' if self.tls else 'http'}://{self.endpoint}/metrics"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"

    def argv(self, initial_cluster: str, state: str) -> list[str]:
        scheme = "https" if self.tls else "http"
        tls = (
            [
                f"--cert-file={self.tls.cert}",
                f"--key-file={self.tls.key}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth",
            ]
            if self.tls
            else []
        )
        return [
            binary("etcd"),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={scheme}://{self.endpoint}",
            f"--advertise-client-urls={scheme}://{self.endpoint}",
            *tls,
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={initial_cluster}",
            f"--initial-cluster-state={state}",
            f"--initial-cluster-token={self.cluster_token}",
            "--log-level=warn",
            # Fast elections on loopback, so a cluster test does not wait seconds for a new leader.
            "--heartbeat-interval=50",
            "--election-timeout=500",
            *self.flags,
        ]

    def start(self, initial_cluster: str, state: str = "new") -> None:
        self.process = Process(self.name, self.argv(initial_cluster, state), self.log_dir)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        if self.tls:  # /health would need our client certificate; a listening port will do
            wait_for_port(self.client_port, self.process, timeout=timeout)
        else:
            wait_for_http(f"http://{self.endpoint}/health", self.process, timeout=timeout)

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            self.process.stop()
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
        self.process = None

    def pause(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.alive():
            os.kill(self.process.pid, signal.SIGCONT)

    def wipe(self) -> None:
        """Stop the member and delete its data: started again, it is a new, empty etcd."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


class EtcdCluster:
    """`size` members on loopback; ``endpoints`` is what --etcd takes. `flags` go to every member.

    Each member's (client, peer) ports are free ones unless `ports` names them: ``make run``'s
    etcd sits on a documented port, so that the commands it prints still work after a restart."""

    def __init__(
        self,
        base_dir: Path,
        size: int = 1,
        *,
        tls: ServerTls | None = None,
        flags: Sequence[str] = (),
        ports: Sequence[tuple[int, int]] = (),
    ) -> None:
        if ports and len(ports) != size:
            raise ValueError(f"{size} member(s) but {len(ports)} pair(s) of ports")
        base_dir.mkdir(parents=True, exist_ok=True)
        chosen = list(ports) or [(0, 0)] * size
        self.members = [
            EtcdMember(
                f"etcd{i}",
                base_dir / f"etcd{i}.data",
                base_dir,
                client_port=client,
                peer_port=peer,
                tls=tls,
                flags=flags,
            )
            for i, (client, peer) in enumerate(chosen)
        ]

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def start(self) -> EtcdCluster:
        for member in self.members:
            member.start(self.initial_cluster)
        for member in self.members:
            member.wait_healthy()
        return self

    def restart(self, member: EtcdMember) -> None:
        """Start a stopped or killed member again on its data (and ports)."""
        member.start(self.initial_cluster, state="existing" if len(self.members) > 1 else "new")
        member.wait_healthy()

    def replace(self, member: EtcdMember, *, cluster_token: str | None = None) -> None:
        """Wipe a member of a one-member cluster and start a new, empty etcd in its place, on the
        same ports (a restore from nothing). With another `cluster_token` the cluster id changes."""
        if len(self.members) != 1:
            raise ValueError("only a one-member cluster can be replaced by a new one")
        member.wipe()
        if cluster_token is not None:
            member.cluster_token = cluster_token
        member.start(self.initial_cluster, state="new")
        member.wait_healthy()

    def stop(self) -> None:
        for member in self.members:
            member.stop()


class EtcdGrpcProxy:
    """``etcd grpc-proxy start`` (the same binary) in front of a cluster: what sidecars' ``--etcd``
    points at when there are many of them, since it folds their watches of one prefix into one
    watch on the cluster. Plain gRPC towards its clients unless `flags`, passed through, say
    otherwise: TLS towards the cluster is ``--cacert``, ``--cert``, ``--key`` (a certificate with an
    empty Common Name, or the proxy refuses to start), towards the sidecars ``--cert-file``,
    ``--key-file`` and ``--trusted-ca-file`` (then a client certificate is required)."""

    def __init__(self, cluster: str, log_dir: Path, *, name: str = "grpc-proxy", flags: Sequence[str] = ()) -> None:
        self.cluster = cluster
        self.name = name
        self.log_dir = log_dir
        self.flags = tuple(flags)
        self.port = free_port()
        self.metrics_port = free_port()
        self.process: Process | None = None

    @property
    def endpoints(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def argv(self) -> list[str]:
        return [
            binary("etcd"),
            "grpc-proxy",
            "start",
            f"--endpoints={self.cluster}",
            f"--listen-addr={self.endpoints}",
            # The proxy dials its advertised address itself; the default (127.0.0.1:23790) could
            # be anyone's port.
            f"--advertise-client-url={self.endpoints}",
            f"--metrics-addr=http://{LOOPBACK}:{self.metrics_port}",
            f"--data-dir={self.log_dir / (self.name + '.data')}",
            *self.flags,
        ]

    def start(self, timeout: float = 30.0) -> EtcdGrpcProxy:
        self.process = Process(self.name, self.argv(), self.log_dir)
        try:
            # Not /health: with auth enabled on the cluster it answers 503 for good (its own probe
            # read carries no credentials), though the proxy serves.
            wait_for_http(self.metrics_url, self.process, timeout=timeout)
        except BaseException:
            self.stop()  # the caller has no handle on a proxy that did not start
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


def scrape(url: str, names: Iterable[str]) -> dict[str, float]:
    """The unlabelled samples `names` from a Prometheus text page (etcd's and the proxy's own
    counters and gauges); a name the page lacks is left out."""
    wanted = set(names)
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a loopback URL
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[name] = float(value)
    return found
