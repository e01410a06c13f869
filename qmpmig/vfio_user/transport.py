"""A vfio-user endpoint over a UNIX stream socket: the thin asyncio layer
under :mod:`.client` and :mod:`.server`.

It moves bytes and SCM_RIGHTS fds between the socket and a sans-IO
:class:`~.codec.Connection`, matches replies to requests by msg_id (FIFO
per id: ids may repeat), and hands commands from the peer to
:meth:`Endpoint.handle_command`.  It takes no protocol decision of its own.
A reply that cannot be decoded fails its
request at once with the reason; when the socket closes or the framing is
lost, every waiter gets :class:`~qmpmig.errors.Disconnected` at once, with
the reason.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import ctypes
import errno
import logging
import os
import socket
from typing import Any

from ..errors import DeviceError, Disconnected, ErrorReply, LocalProtocolError, ProtocolError
from . import codec
from .codec import BadMessage, Message

log = logging.getLogger("qmpmig.vfio_user")

#: Socket buffer asked for each way (the kernel caps it at net.core.wmem_max
#: and rmem_max): a whole MIG_DATA message goes out in one send.
SOCKET_BUFFER = 4 << 20

#: glibc mallopt parameters: M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_large_buffers(size: int = 64 << 20) -> None:
    """Have glibc's malloc reuse freed buffers up to ``size`` bytes instead of
    returning them to the kernel: a data transfer allocates a fresh MiB
    buffer per message, and an mmap'd one costs a page fault per 4 KiB on
    first touch (measured: the reference device's stop-copy stream ran 2.4
    times slower).  For a device process; the daemon, which lives long and
    holds many VMs, does without (its memory would keep the high-water mark
    of the largest transfer; no faster relay was measured).  A no-op where
    the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, size)
        libc.mallopt(_M_TRIM_THRESHOLD, 4 * size)
    except (OSError, AttributeError):
        pass


def _wake(ready: asyncio.Future) -> None:
    if not ready.done():
        ready.set_result(None)


def _settle(result: asyncio.Future, waiter: asyncio.Future, cmd: codec.Command) -> None:
    """A request's outcome from its reply: the reply, ErrorReply for an
    error reply, DeviceError EPROTO for a reply of another command (its
    payload is not the one the caller reads), or the waiter's exception."""
    if result.done():
        if not waiter.cancelled():
            waiter.exception()          # retrieved: the caller gave up first
        return
    if waiter.cancelled():
        result.cancel()
    elif waiter.exception() is not None:
        result.set_exception(waiter.exception())
    elif (reply := waiter.result()).cmd != cmd:
        for fd in reply.fds:
            os.close(fd)
        result.set_exception(DeviceError(errno.EPROTO, f"{codec.Command(cmd).name} answered by a "
                                                       f"{codec.Command(reply.cmd).name} reply"))
    elif reply.error_no or reply.payload is None:
        result.set_exception(ErrorReply(cmd, codec.Command(cmd).name, reply.error_no))
    else:
        result.set_result(reply)


class Endpoint:
    """One side of a vfio-user connection."""

    #: Handle the peer's commands one at a time, in arrival order, before
    #: reading on (a server does: spec, "processes commands in order").
    inline_commands = True

    def __init__(self, sock: socket.socket, role: codec.Party, **limits: int):
        sock.setblocking(False)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        self.sock = sock
        self.conn = codec.Connection(role, **limits)
        self._waiters: dict[int, collections.deque[asyncio.Future]] = collections.defaultdict(collections.deque)
        self._next_id = 0
        self._tasks: set[asyncio.Task] = set()
        self._reader: asyncio.Task | None = None
        self._send_lock = asyncio.Lock()
        self.closed = asyncio.Event()
        self.closed_because = ""
        #: Close the connection once the reply being sent has gone out.
        self.hangup_after_reply = False
        #: Send only this many bytes of the next reply, then close (a
        #: device's debug defect: a connection cut mid-message).
        self.cut_next_reply: int | None = None

    # -- bytes and fds ------------------------------------------------------

    async def _recv(self) -> tuple[bytes, list[int]]:
        loop = asyncio.get_running_loop()
        fd_room = socket.CMSG_SPACE(self.conn.max_msg_fds * array.array("i").itemsize)
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(self.conn.max_message_size, fd_room)
                break
            except (BlockingIOError, InterruptedError):
                await self._ready(loop.add_reader, loop.remove_reader)
        fds = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[:len(payload) - len(payload) % 4]))
        return data, fds

    async def _ready(self, add, remove) -> None:
        """Wait until the socket is readable (add_reader) or writable
        (add_writer); Disconnected if the connection closes first (a send
        pipelined behind others may find it closed under it)."""
        fd = self.sock.fileno()
        if fd < 0:
            raise self._gone()
        ready = asyncio.get_running_loop().create_future()
        add(fd, _wake, ready)
        closing = asyncio.ensure_future(self.closed.wait())
        try:
            await asyncio.wait({ready, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            remove(fd)
        if not ready.done():
            raise self._gone()

    def _gone(self) -> Disconnected:
        return Disconnected(f"vfio-user connection closed: {self.closed_because or 'closed by this side'}")

    async def send(self, msg: Message) -> None:
        """Send one message whole: a cancelled caller does not cut it short
        (half a message would desynchronise the stream for good)."""
        pieces = self.conn.send_pieces(msg)
        await asyncio.shield(self._send_whole(pieces, msg.fds))

    async def _send_whole(self, pieces: list[bytes], fds: tuple[int, ...]) -> None:
        """Gather-send ``pieces``, the fds with the first byte."""
        loop = asyncio.get_running_loop()
        async with self._send_lock:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            views = [memoryview(piece) for piece in pieces if len(piece)]
            while views:
                if self.closed.is_set():
                    raise self._gone()
                try:
                    sent = self.sock.sendmsg(views, ancillary)
                except (BlockingIOError, InterruptedError):
                    await self._ready(loop.add_writer, loop.remove_writer)
                    continue
                ancillary = []
                while sent and sent >= len(views[0]):
                    sent -= len(views.pop(0))
                if sent:
                    views[0] = views[0][sent:]

    # -- requests and replies ----------------------------------------------

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read_loop(), name="vfio-user reader")

    async def request(self, cmd: codec.Command, payload: Any, fds: tuple[int, ...] = ()) -> Message:
        """Send a command and wait for its reply; raise ErrorReply for an
        error reply, Disconnected if the socket closes first."""
        waiter = await self.submit(cmd, payload, fds)
        try:
            return await waiter
        finally:
            if not waiter.done():
                waiter.cancel()

    async def submit(self, cmd: codec.Command, payload: Any, fds: tuple[int, ...] = ()) -> asyncio.Future:
        """Send a command; return, once it is sent, the future of its reply
        (as :meth:`request` gives it) without waiting for it: requests
        pipelined on one socket, answered in order."""
        if self.closed.is_set():
            raise self._gone()
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        loop = asyncio.get_running_loop()
        waiter, result = loop.create_future(), loop.create_future()
        self._waiters[msg_id].append(waiter)
        waiter.add_done_callback(lambda _: _settle(result, waiter, cmd))
        result.add_done_callback(lambda _: waiter.done() or self._forget(msg_id, waiter))
        try:
            await self.send(Message(msg_id, cmd, payload, fds=tuple(fds)))
        except BaseException:
            result.cancel()
            raise
        return result

    def _forget(self, msg_id: int, waiter: asyncio.Future) -> None:
        """A request given up on: its reply, when it comes, matches nothing."""
        if waiter in self._waiters.get(msg_id, ()):
            self._waiters[msg_id].remove(waiter)

    async def _read_loop(self) -> None:
        why = "the peer closed the connection"
        try:
            while True:
                event = self.conn.next_event()
                if event is codec.NEED_DATA:
                    data, fds = await self._recv()
                    if not data:
                        for fd in fds:
                            os.close(fd)
                        break
                    self.conn.receive_data(data, fds)
                    continue
                if isinstance(event, BadMessage):
                    await self._bad_message(event)
                    if event.fatal:
                        why = f"malformed message from the peer: {event.reason}"
                        break
                elif event.reply:
                    self._deliver(event)
                elif self.inline_commands:
                    await self._serve(event)
                else:
                    task = asyncio.create_task(self._serve(event))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except (ConnectionError, OSError, ProtocolError) as err:
            log.info("vfio-user connection ends: %s", err)
            why = str(err) or type(err).__name__
        finally:
            self._shutdown(why)

    def _deliver(self, reply: Message) -> None:
        queue = self._waiters.get(reply.msg_id)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(reply)
                return
        for fd in reply.fds:
            os.close(fd)
        log.warning("reply %d to %s matches no request", reply.msg_id, reply.cmd)

    async def _bad_message(self, bad: BadMessage) -> None:
        for fd in bad.fds:
            os.close(fd)
        log.warning("malformed message %d (cmd %s): %s", bad.msg_id, bad.cmd, bad.reason)
        if bad.reply and not bad.fatal:
            self._fail(bad.msg_id, DeviceError(errno.EPROTO, f"malformed reply: {bad.reason}"))
        if not bad.reply:
            with contextlib.suppress(OSError, ProtocolError):
                await self.send(codec.error_reply(bad, bad.errno))

    async def _serve(self, msg: Message) -> None:
        try:
            payload, fds = await self.handle_command(msg)
            reply = codec.reply_to(msg, payload, fds=fds)
        except Exception as err:
            for fd in msg.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if isinstance(err, (OSError, ProtocolError)):     # the client's fault: said, not a bug
                log.info("%s refused: %s", getattr(msg.cmd, "name", msg.cmd), err)
            else:
                log.exception("%s: handler failed", getattr(msg.cmd, "name", msg.cmd))
            reply = codec.error_reply(msg, getattr(err, "errno", None) or errno.EIO)
        if self.cut_next_reply is not None:
            await self._send_whole([self.conn.send(reply)[:self.cut_next_reply]], ())
            raise ConnectionAbortedError("cut mid-reply on purpose")
        if not msg.no_reply or reply.error_no:
            try:
                await self.send(reply)
            except LocalProtocolError as err:
                await self.send(codec.error_reply(msg, errno.EINVAL))
                log.warning("reply to %s not sendable: %s", msg.cmd, err)
        if self.hangup_after_reply:
            raise ConnectionAbortedError("closing after the reply, as the protocol demands")

    async def handle_command(self, msg: Message) -> tuple[Any, tuple[int, ...]]:
        """Answer a command from the peer: (reply payload, fds), or raise
        OSError(errno) for an error reply."""
        raise OSError(errno.EINVAL, "no commands accepted from this peer")

    def _fail(self, msg_id: int, err: Exception) -> None:
        """The oldest request of ``msg_id`` ends with ``err``."""
        queue = self._waiters.get(msg_id)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_exception(err)
                return

    def _shutdown(self, why: str = "closed by this side") -> None:
        self.closed.set()
        self.closed_because = why
        for queue in self._waiters.values():
            for waiter in queue:
                if not waiter.done():
                    waiter.set_exception(Disconnected(f"vfio-user connection closed: {why}"))
        self._waiters.clear()
        self.sock.close()
        for fd in self.conn.pending_fds:    # they came with half a message
            with contextlib.suppress(OSError):
                os.close(fd)
        self.on_disconnect()

    def on_disconnect(self) -> None:
        """Hook: the connection is gone."""

    async def close(self) -> None:
        if self._reader and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for task in list(self._tasks):
            task.cancel()
        if not self.closed.is_set():
            self._shutdown()
