"""free_port() hands out each port once per process: a stack picks its four
ports before any of them listens, so a port that is free when picked must
not be picked again (seen: a stack's service and Envoy given the same port,
Envoy then refusing to start)."""

from __future__ import annotations

from agentlab.devstack import free_port


def test_a_process_is_never_handed_the_same_port_twice() -> None:
    ports = [free_port() for _ in range(2_000)]
    assert len(set(ports)) == len(ports)
