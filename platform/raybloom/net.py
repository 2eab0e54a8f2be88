"""Network checks shared by the drivers and the local cluster: is anything listening, which ports are free."""

from __future__ import annotations

import socket
from typing import Optional


def unreachable(address: str, timeout: float = 3.0) -> Optional[str]:
    """Why nothing accepts a TCP connection at HOST:PORT ([v6]:PORT too); None when something does."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except ValueError:
        return f"{address!r} is not HOST:PORT"
    except OSError as e:
        return e.strerror or str(e)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    return unreachable(f"{host}:{port}", timeout=1) is None


def free_ports(n: int) -> list[int]:
    """`n` distinct ports nothing listens on right now (the OS picks them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
