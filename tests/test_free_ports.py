"""Free ports for the processes tests and the local mesh start: never one an outgoing connection
can be given meanwhile, never the same twice, never one in use."""

from __future__ import annotations

import contextlib
import socket

from authz_sidecar.local import processes
from authz_sidecar.local.processes import LOOPBACK, free_port


def test_free_ports_are_below_the_ephemeral_range_distinct_and_bindable() -> None:
    """An Envoy of the scenario failed to bind a port free_port had given (the kernel's bind(0),
    in the ephemeral range): an outgoing connection took it first. Ports now come from below it."""
    floor = processes._ephemeral_floor()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(processes.LOWEST_PORT <= port < floor for port in ports)
    for port in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, port))


def test_a_port_in_use_is_passed_over() -> None:
    ports = range(processes.LOWEST_PORT, processes._ephemeral_floor())
    free_port()  # (the cursor is set)
    upcoming = ports[processes._cursor[0] % len(ports)]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        with contextlib.suppress(OSError):  # in use already: passed over all the same
            taken.bind((LOOPBACK, upcoming))
        assert free_port() != upcoming
