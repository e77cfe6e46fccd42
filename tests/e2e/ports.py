"""Ports for the services a test starts."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ports handed out in this test process, never handed out twice.
_given: set[int] = set()


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections (32768 by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nothing listens on right now, below the kernel's range for outgoing connections.

    A port the kernel picks for `bind(0)` comes from that range, where any outgoing connection
    (a health probe, a database client) may take it as its local port before the service that
    was given it binds: CI saw a worker fail with "Address already in use" that way. Below the
    range only listeners take ports, and this process hands each out once.
    """
    high = _ephemeral_low()
    low = max(1024, high - 12000)
    for _ in range(200):
        port = random.randrange(low, high)
        if port in _given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {low}..{high}")
