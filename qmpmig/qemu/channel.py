"""QEMU's migration stream, on a socket qmpmig opens and hands to the source
QEMU (QMP ``getfd``, then ``migrate`` with ``fd:NAME``).

QEMU 7.2 sends the last of its RAM from inside its big lock
(``migration_completion``).  When that write blocks, on a link that died
or on a destination that stopped reading, the monitor blocks with it, and
``migrate_cancel`` (whose work is a ``shutdown()`` of the stream) never
runs: the source QEMU stays frozen until TCP gives up, some fifteen
minutes by the kernel's defaults.  qmpmig keeps a descriptor of the
same socket, so it can do that ``shutdown()`` from outside the lock
(:meth:`Stream.shutdown`), and on TCP it bounds how long data may go
unacknowledged (``TCP_USER_TIMEOUT``), for when nobody is left to.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

#: Seconds QEMU's stream may hold data the destination's kernel has not
#: acknowledged (or hold a zero window) before the kernel ends it.  A live
#: destination acknowledges within milliseconds; this only ends a dead one.
USER_TIMEOUT = 20.0
#: The name QEMU files the descriptor under (QMP getfd).
FD_NAME = "qmpmig-migration"


def address(uri: str) -> tuple[int, object] | None:
    """(family, address) of a ``unix:PATH`` or ``tcp:HOST:PORT`` URI, in
    QEMU's syntax (an IPv6 host in brackets); None for any other (QEMU
    opens those itself)."""
    scheme, _, rest = uri.partition(":")
    if scheme == "unix" and rest:
        return socket.AF_UNIX, rest
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            return socket.AF_INET6, (host[1:-1], int(port))
        if host and port.isdigit():
            return socket.AF_INET, (host, int(port))
    return None


class Stream:
    """qmpmig's descriptor of the socket QEMU migrates over."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        #: Whether qmpmig shut the stream down itself.
        self.shut = False

    @classmethod
    async def connect(cls, uri: str, timeout: float = 10.0) -> Stream | None:
        """The stream to the destination listening at ``uri``, connected,
        or None where QEMU has to open it itself; OSError if it cannot."""
        if (where := address(uri)) is None:
            return None
        family, addr = where
        if family != socket.AF_UNIX:
            infos = await asyncio.get_running_loop().getaddrinfo(*addr, type=socket.SOCK_STREAM)
            family, addr = infos[0][0], infos[0][4]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, addr), timeout)
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(USER_TIMEOUT * 1000))
            sock.setblocking(True)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def shutdown(self) -> None:
        """What ``migrate_cancel`` does to the stream, done from outside
        QEMU: its blocked write fails, and its migration with it."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.shut = True

    def close(self) -> None:
        self.sock.close()
