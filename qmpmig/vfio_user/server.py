"""An asyncio vfio-user server: a listening UNIX socket, one client at a
time, VERSION first, then each command to the handler's entry for it in
its :attr:`~Handler.commands` table.

The entry answers with a reply payload (and fds), or raises OSError whose
errno goes into the error reply.  Malformed messages never reach it: the
transport answers them with EINVAL and the connection carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol

from . import codec
from .codec import Command
from .transport import Endpoint

log = logging.getLogger("qmpmig.vfio_user")
MAJOR, MINOR = 0, 1


class Handler(Protocol):
    """What a device offers the server."""

    #: Command -> its server: ``serve(msg)`` returns the reply payload, or
    #: (payload, fds); it may be a coroutine function.
    commands: dict[Command, Callable[[codec.Message], Any]]

    def attach(self, endpoint: Endpoint) -> None:
        """A client connected."""

    def detach(self) -> None:
        """The client left."""


class ServerEndpoint(Endpoint):
    """The server end of one client connection."""

    def __init__(self, sock: socket.socket, handler: Handler, capabilities: dict,
                 max_data_xfer_size: int = codec.DEFAULT_MAX_DATA_XFER):
        super().__init__(sock, codec.Party.SERVER, max_data_xfer_size=max_data_xfer_size,
                         max_msg_fds=capabilities.get("max_msg_fds", 1))
        self.handler = handler
        self.capabilities = capabilities
        self.negotiated = False

    async def handle_command(self, msg: codec.Message):
        if not self.negotiated:
            if msg.cmd != Command.VERSION:
                self.hangup_after_reply = True
                raise OSError(errno.EINVAL, f"first command must be VERSION, not {msg.cmd!r}")
            return self._version(msg.payload), ()
        if msg.cmd == Command.VERSION:
            raise OSError(errno.EINVAL, "VERSION after negotiation")
        serve = self.handler.commands.get(msg.cmd)
        if serve is None:
            raise OSError(errno.EINVAL, f"{Command(msg.cmd).name} is not served")
        result = serve(msg)
        if inspect.isawaitable(result):
            result = await result
        return result if isinstance(result, tuple) else (result, ())

    def _version(self, proposal: codec.Version) -> codec.Version:
        if proposal.major != MAJOR:
            self.hangup_after_reply = True
            raise OSError(errno.EINVAL, f"version {proposal.major}.{proposal.minor} is not {MAJOR}.x")
        # Data the client sends us is bounded by what we offered; data we
        # send (REGION_READ, MIG_DATA_READ replies) by what it can take.
        theirs = proposal.capabilities
        self.conn.max_data_xfer_size = min(self.conn.max_data_xfer_size,
                                           theirs.get("max_data_xfer_size", codec.DEFAULT_MAX_DATA_XFER))
        self.negotiated = True
        return codec.Version(MAJOR, min(proposal.minor, MINOR), self.capabilities)


#: struct ucred: pid, uid, gid.
UCRED = struct.Struct("iII")


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    return UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))[1]


async def serve_unix(path: str, handler: Handler, capabilities: dict | None = None,
                     ready: asyncio.Event | None = None, allowed_uids: frozenset[int] = frozenset()) -> None:
    """Serve clients on ``path``, one at a time, until cancelled.  The
    handler's ``attach(endpoint)`` and ``detach()`` bracket each client.

    The socket is 0600 whatever the umask, in a directory made 0700 if it
    is missing; a client whose uid (SO_PEERCRED) is not root's, this
    process's or one of ``allowed_uids`` is hung up on before a byte is
    read: a device's client can read and write the guest memory it maps."""
    capabilities = capabilities or {"max_msg_fds": 8, "max_data_xfer_size": codec.QMPMIG_MAX_DATA_XFER}
    allowed = {0, os.getuid(), *allowed_uids}
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind aside and rename into place once listening: whoever sees the
    # path can connect.
    staging = f"{path}.{os.getpid()}.tmp"
    umask = os.umask(0o177)
    try:
        listener.bind(staging)
    finally:
        os.umask(umask)
    listener.listen(1)
    os.rename(staging, path)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    if ready:
        ready.set()
    try:
        while True:
            sock, _ = await loop.sock_accept(listener)
            if (uid := peer_uid(sock)) not in allowed:
                log.warning("refused a client of uid %d on %s", uid, path)
                sock.close()
                continue
            endpoint = ServerEndpoint(sock, handler, capabilities,
                                      max_data_xfer_size=capabilities.get("max_data_xfer_size", codec.DEFAULT_MAX_DATA_XFER))
            handler.attach(endpoint)
            endpoint.start()
            try:
                await endpoint.closed.wait()
            finally:
                await endpoint.close()
                handler.detach()
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
