"""Whether a local TCP address can be listened on, asked before a server binds it.

Why ask first: when grpc cannot bind, it raises a RuntimeError that names no cause ("Failed to bind ...; set
GRPC_VERBOSITY=debug") after printing a C log line, and asyncio's servers raise a bare OSError. One plain
bind with the same SO_REUSEADDR that both set says which address and why (in use, not this machine's, a
privileged port), as a SetupError the CLI prints as one line. A free port can still be taken a moment
later, so servers keep their own check at the real bind.
"""

from __future__ import annotations

import errno
import socket

from protocol.errors import SetupError

_HINTS = {
    errno.EADDRINUSE: "another process is listening there; pick another port, or 0 for any free one",
    errno.EADDRNOTAVAIL: "that is not an address of this machine; use one of its own, or 0.0.0.0 and --announce",
    errno.EACCES: "ports below 1024 need root; pick a higher one",
}


def check_listenable(host: str, port: int, what: str) -> None:
    """Raise SetupError naming `what` (a flag, a server) unless a listening socket can be bound at host:port."""
    address = f"{host}:{port}"
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise SetupError(f"{what}: cannot listen on {address} (unknown host: {exc})") from exc
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise SetupError(bind_error(what, address, exc)) from exc


def bind_error(what: str, address: str, exc: OSError) -> str:
    """One line: which address could not be bound, why, and what to do."""
    hint = _HINTS.get(exc.errno or 0)
    return f"{what}: cannot listen on {address} ({exc.strerror or exc})" + (f"; {hint}" if hint else "")
