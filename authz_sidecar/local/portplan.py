"""The ports of ``make run``'s two-region mesh, decided and checked before anything starts.

A fixed plan (us-east's Envoy on 8080, eu-west's on 8090, etcd on 8100, ...; docs/cli.md) so the
commands the mesh prints are the same on every run, a base port to move it all, or any free ports
for tests that run meshes side by side. :meth:`PortPlan.taken` names the first planned port
something else holds, with its role, so a clash is one clear line rather than half a mesh.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass

from authz_sidecar.errors import ConfigError
from authz_sidecar.local.processes import LOOPBACK, free_port

REGIONS = ("us-east", "eu-west")
DEFAULT_BASE_PORT = 8080


@dataclass(frozen=True)
class RegionPorts:
    """One region's ports: its Envoy (listener and admin), its sidecar (gRPC, ops HTTP), the demo
    service behind them."""

    envoy: int
    upstream: int
    grpc: int
    http: int
    admin: int


# Offsets from the base port: region n at 10 * n, the shared processes from 20 (docs/cli.md).
REGION_OFFSETS = {"envoy": 0, "upstream": 1, "grpc": 2, "http": 3, "admin": 4}
REGION_STRIDE = 10
SHARED_OFFSETS = {"etcd_client": 20, "etcd_peer": 21, "controller_metrics": 22}
ROLE_NAMES = {
    "envoy": "Envoy",
    "upstream": "demo service",
    "grpc": "sidecar gRPC",
    "http": "sidecar ops HTTP",
    "admin": "Envoy admin",
    "etcd_client": "etcd clients",
    "etcd_peer": "etcd peers",
    "controller_metrics": "controller metrics",
}
SPAN = max(SHARED_OFFSETS.values()) + 1


@dataclass(frozen=True)
class PortPlan:
    """Every port the mesh listens on, by role."""

    regions: Mapping[str, RegionPorts]
    etcd_client: int
    etcd_peer: int
    controller_metrics: int

    @staticmethod
    def fixed(base: int = DEFAULT_BASE_PORT) -> PortPlan:
        """The documented plan from `base`: us-east's Envoy on base, eu-west's on base + 10, etcd on
        base + 20 (8080, 8090, 8100 by default)."""
        if not 1024 <= base <= 65535 - SPAN:
            raise ConfigError(f"--base-port: {base} is not between 1024 and {65535 - SPAN}")
        regions = {
            region: RegionPorts(**{role: base + REGION_STRIDE * n + off for role, off in REGION_OFFSETS.items()})
            for n, region in enumerate(REGIONS)
        }
        return PortPlan(regions, **{role: base + off for role, off in SHARED_OFFSETS.items()})

    @staticmethod
    def free() -> PortPlan:
        """Any free ports, each distinct (tests run several meshes side by side)."""
        ports: set[int] = set()

        def one() -> int:
            while (port := free_port()) in ports:
                pass
            ports.add(port)
            return port

        regions = {region: RegionPorts(**{role: one() for role in REGION_OFFSETS}) for region in REGIONS}
        return PortPlan(regions, **{role: one() for role in SHARED_OFFSETS})

    def roles(self) -> list[tuple[int, str]]:
        """(port, what listens there), in the plan's order."""
        listed = [
            (getattr(ports, role), f"{region} {ROLE_NAMES[role]}")
            for region, ports in self.regions.items()
            for role in REGION_OFFSETS
        ]
        return listed + [(getattr(self, role), ROLE_NAMES[role]) for role in SHARED_OFFSETS]

    def taken(self) -> tuple[int, str] | None:
        """The first planned port something already listens on (or may not be bound), with its
        role; None when every one is free. Bound as the servers bind (SO_REUSEADDR), so a port
        only lingering in TIME_WAIT from a mesh just stopped counts as free."""
        for port, role in self.roles():
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((LOOPBACK, port))
                except OSError:
                    return port, role
        return None
