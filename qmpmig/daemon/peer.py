"""Daemon to daemon, between hosts: the control protocol over TCP with TLS,
both ends authenticated by x509 certificates of one CA, as QEMU's and
libvirt's migration TLS do (and with their files: a directory holding
``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``,
``client-cert.pem`` and ``client-key.pem``, which is QEMU's
``tls-creds-x509`` layout; libvirt's migration certificates in
``/etc/pki/qemu`` serve as they are).

- The listening daemon presents its server certificate and demands a
  client certificate signed by the CA (``CERT_REQUIRED``): a peer without
  one is cut off during the handshake and never reaches a request.
- The connecting daemon checks the server's certificate against the CA
  and the address it dialled (host name or IP in the certificate's
  subjectAltName): a host that cannot prove it is the destination gets
  nothing from it and can inject nothing into it.
- TLS 1.3 only.  Over the channel a peer may make only :data:`PEER_OPS`
  requests; the rest of the control protocol stays local.
- Guest pages travel with a CRC-32 per request and are written only into
  a VM the destination's daemon was told to expect (``expect``), for that
  migration id, while the expectation holds.
- A dead link is not a slow peer: each end's kernel gives the connection
  up once the other's has acknowledged nothing for :data:`LINK_TIMEOUT`
  (TCP keepalive when idle, TCP_USER_TIMEOUT with data in flight), so
  every request under way fails then, whatever its own bound
  (:func:`bound_dead_link`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..errors import QmpmigError
from . import control

#: The port a daemon serves peers on unless told otherwise (``--listen``).
DEFAULT_PORT = 7780
#: libvirt's (and QEMU's default) directory for migration certificates.
DEFAULT_TLS_DIR = Path("/etc/pki/qemu")
#: The requests a peer daemon may make.
PEER_OPS = frozenset({"status", "migrations", "expect", "expected", "ram_write", "ram_crcs",
                      "incoming_qmp", "incoming_watch", "incoming_device", "incoming_end", "incoming_wait",
                      "incoming_resume"})
#: Seconds for the connection and the handshake, and for the requests that
#: set a migration up (owner._peer_vm) before its first long poll.
PEER_TIMEOUT = 30.0
#: Seconds one request may take (a device's or QEMU's own bounds are shorter).
CALL_TIMEOUT = 90.0
#: Seconds between looks at a request's deadline (Peer.deadline_of may move).
RECHECK = 0.05
#: Seconds a connection outlives a peer host whose kernel acknowledges
#: nothing (a cut link, a dead host): shorter than what the guest's pause
#: may bear (Options.max_pause less the recovery's margin, 3.5 s by default).
LINK_TIMEOUT = 3.0
#: Seconds a peer driving an incoming migration may ask nothing new of this
#: daemon, with nothing but a long poll of it under way, before it is taken
#: for lost (a healthy source asks again at least every LONG_POLL_MAX).
PEER_SILENCE = 10.0
#: The requests that are held until something changes (long polls): one
#: under way is not work the peer waits for, and its answer is not news of
#: the peer.
LONG_POLLS = frozenset({"incoming_watch"})
#: Requests of one peer connection answered at once; past it the daemon
#: reads no more of that connection until one is answered (TCP holds the
#: peer back): what a peer can make this daemon hold is bounded by it,
#: with control.MAX_PAYLOAD a request.
MAX_IN_FLIGHT = 16
#: TCP connections to the peer port open at once, TLS handshakes under way
#: included; past it a new one is closed at once.  Strangers can then keep
#: peers out (as a full listen backlog would), not use up the daemon's file
#: descriptors, which its VMs and devices need.
MAX_PEER_SOCKETS = 64
#: Seconds a long poll is held at most: well inside PEER_SILENCE, so that a
#: peer that stopped asking (its daemon hung) is seen within PEER_SILENCE.
LONG_POLL_MAX = 3.0
#: Seconds past its hold a long poll may take to come back before its peer
#: is taken for hung (its kernel may still acknowledge: LINK_TIMEOUT cannot tell).
LONG_POLL_GRACE = 5.0


class PeerError(QmpmigError):
    """A peer daemon could not be reached, did not prove who it is, or said no."""


def _files(tls_dir: Path, role: str) -> tuple[Path, Path, Path]:
    paths = (tls_dir / "ca-cert.pem", tls_dir / f"{role}-cert.pem", tls_dir / f"{role}-key.pem")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PeerError(f"TLS credentials missing: {', '.join(missing)}")
    return paths


def context(tls_dir: Path, role: str) -> ssl.SSLContext:
    """The TLS context of a ``server`` (listening: the peer's certificate
    demanded) or a ``client`` (dialling: the server's certificate and name
    checked, which PROTOCOL_TLS_CLIENT does by default)."""
    ca, cert, key = _files(tls_dir, role)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if role == "server" else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise PeerError(f"{address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def peer_name(writer: asyncio.StreamWriter) -> str:
    """Who the peer's certificate says it is (its subject's commonName)."""
    cert = writer.get_extra_info("peercert") or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return "?"

#: What a read says once the kernel gave the connection up (bound_dead_link).
DEAD_LINK = frozenset({errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH})


def bound_dead_link(writer: asyncio.StreamWriter) -> None:
    """The connection ends within :data:`LINK_TIMEOUT` of the peer's kernel
    falling silent: probed after a second idle, given up when data or
    probes stay unacknowledged that long.  A peer that is slow to answer
    keeps it (its kernel acknowledges).  A connection already closed (a
    peer refusing this host's certificate) is left to say so at its first
    request."""
    if (sock := writer.get_extra_info("socket")) is None:
        return
    with contextlib.suppress(OSError):
        for level, option, value in ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                                     (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1),
                                     (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1),
                                     (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, int(LINK_TIMEOUT)),
                                     (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(LINK_TIMEOUT * 1000))):
            sock.setsockopt(level, option, value)


class Peer:
    """One TLS connection to the daemon at ``address`` (``async with``),
    for any number of requests at once: each reply finds its request by id."""

    def __init__(self, address: str, tls_dir: Path):
        self.address, self.tls_dir = address, Path(tls_dir)
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reading: asyncio.Task | None = None
        self._lost: str | None = None
        #: Whether the peer has answered anything on this connection.
        self._answered = False
        #: start -> when a request begun then must be answered by, sooner
        #: than CALL_TIMEOUT (the controller's, while its guest is paused:
        #: Walker.paused_deadline), or None.  Long polls keep their own bound.
        self.deadline_of: Callable[[float], float | None] = lambda start: None

    async def __aenter__(self) -> "Peer":
        host, port = split_address(self.address)
        try:
            reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context(self.tls_dir, "client"), server_hostname=host),
                PEER_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as err:
            raise PeerError(f"peer {self.address}: {err or type(err).__name__}") from None
        bound_dead_link(self._writer)
        self._reading = asyncio.create_task(self._read(reader))
        return self

    async def __aexit__(self, *exc) -> None:
        if self._reading:
            self._reading.cancel()
        if self._writer:
            self._writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        lines = control.LineReader()
        try:
            while data := await reader.read(1 << 16):
                for message in lines.feed(data):
                    self._answered = True
                    waiter = self._waiting.pop(message.get("id"), None)
                    if waiter and not waiter.done():
                        waiter.set_result(message)
            self._give_up("it closed the connection")
        except (OSError, control.ControlError) as err:
            if isinstance(err, OSError) and err.errno in DEAD_LINK:
                self._give_up(f"its host acknowledged nothing for {LINK_TIMEOUT:g} s (a dead link): {err}")
            self._give_up(str(err) or type(err).__name__)

    def _give_up(self, why: str) -> None:
        """The connection is lost (the first reason given is kept): every
        request under way fails with it, and so will every later one."""
        self._lost = self._lost or why
        if self._writer:
            self._writer.transport.abort()
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(PeerError(self._why(self._lost)))
        self._waiting.clear()

    async def call(self, op: str, payload: bytes | memoryview = b"", *, within: float | None = None,
                   **args) -> dict:
        """One request (its ``payload`` sent as raw bytes after it, which
        the peer's handler gets as ``data``); its result, or PeerError.
        ``within``: seconds it may take at most, sooner than its own bound."""
        if self._lost:
            raise PeerError(self._why(self._lost))
        msg_id = next(self._ids)
        waiter = self._waiting[msg_id] = asyncio.get_running_loop().create_future()
        start = time.monotonic()
        try:
            self._writer.write(control.request(msg_id, op, args, payload))
            await self._writer.drain()
            while not waiter.done():
                bound, why = self._bound(op, args, start)
                if within is not None and within < bound:
                    bound, why = within, ""
                if (left := start + bound - time.monotonic()) <= 0:
                    # A peer that missed its bound is hung: nothing more is asked of it.
                    self._give_up(f"{op}: no answer within {bound:.1f} s{why}")
                    raise PeerError(self._why(self._lost))
                # Woken now and then: the guest may be paused meanwhile.
                await asyncio.wait({waiter}, timeout=min(left, RECHECK))
            message = waiter.result()
        except OSError as err:
            raise PeerError(self._why(f"{op}: {err or type(err).__name__}")) from None
        finally:
            self._waiting.pop(msg_id, None)
        if not message.get("ok"):
            raise PeerError(f"peer {self.address}: {message.get('error')}")
        return message.get("result", {})

    def _bound(self, op: str, args: dict, start: float) -> tuple[float, str]:
        """Seconds request ``op`` begun at ``start`` may take (it may
        shrink while it waits: the guest paused), and what sets them."""
        if op in LONG_POLLS:
            return min(args.get("timeout", LONG_POLL_MAX), LONG_POLL_MAX) + LONG_POLL_GRACE, " (a long poll)"
        paused = self.deadline_of(start)
        if paused is not None and paused - start < CALL_TIMEOUT:
            return paused - start, " with the guest paused (--max-pause)"
        return CALL_TIMEOUT, ""

    def _why(self, what: str) -> str:
        """The error of a lost connection; one lost before any answer is
        most often the peer refusing this host's certificate after the
        handshake (TLS 1.3 checks the client's certificate then)."""
        hint = "" if self._answered else (" (the peer answered nothing: does its CA sign this host's "
                                          "client certificate?)")
        return f"peer {self.address}: {what}{hint}"

    def bound(self, **bound) -> Callable[..., Awaitable[dict]]:
        """:meth:`call` with some arguments (a migration's VM and id) always given."""
        return lambda op, **args: self.call(op, **bound, **args)


async def call(address: str, tls_dir: Path, op: str, **args) -> dict:
    """One request to the daemon at ``address``; its result, or PeerError."""
    async with Peer(address, tls_dir) as peer:
        return await peer.call(op, **args)
