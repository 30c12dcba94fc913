"""Loaded by every Python the tests start (via PYTHONPATH): refuse all network connections."""

from __future__ import annotations

import socket


class NetworkBlockedError(OSError):
    """Raised by any attempt to open a network connection during the tests."""


_FAMILIES = {socket.AF_INET, socket.AF_INET6}
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _guard(sock: socket.socket) -> None:
    if sock.family in _FAMILIES:
        raise NetworkBlockedError(f"network access blocked in tests (socket family {sock.family!r})")


def connect(self: socket.socket, address: object) -> None:
    _guard(self)
    _connect(self, address)  # type: ignore[arg-type]


def connect_ex(self: socket.socket, address: object) -> int:
    _guard(self)
    return _connect_ex(self, address)  # type: ignore[arg-type]


def getaddrinfo(*args: object, **kwargs: object) -> list[object]:
    raise NetworkBlockedError(f"network access blocked in tests (getaddrinfo{args!r})")


socket.socket.connect = connect  # type: ignore[method-assign]
socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
