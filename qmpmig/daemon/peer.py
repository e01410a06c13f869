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
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import zlib
from collections.abc import Iterable
from pathlib import Path

from ..errors import QmpmigError
from ..qemu.guestmem import COMPARE_CHUNK, GuestRam
from . import control

#: libvirt's (and QEMU's default) directory for migration certificates.
DEFAULT_TLS_DIR = Path("/etc/pki/qemu")
#: The requests a peer daemon may make.
PEER_OPS = frozenset({"status", "migrations", "expect", "expected", "ram_write", "ram_crcs"})
#: Seconds for the connection, the handshake and one answer.
PEER_TIMEOUT = 30.0


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


class Peer:
    """One TLS connection to the daemon at ``address``, for several requests
    in turn (``async with Peer(...) as peer``)."""

    def __init__(self, address: str, tls_dir: Path):
        self.address, self.tls_dir = address, Path(tls_dir)
        self._reader = self._writer = None
        self._lines = control.LineReader()
        self._ids = itertools.count(1)

    async def __aenter__(self) -> "Peer":
        host, port = split_address(self.address)
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context(self.tls_dir, "client"), server_hostname=host),
                PEER_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as err:
            raise PeerError(f"peer {self.address}: {err or type(err).__name__}") from None
        return self

    async def __aexit__(self, *exc) -> None:
        self._writer.close()

    async def call(self, op: str, **args) -> dict:
        """One request; its result, or PeerError."""
        msg_id = next(self._ids)
        try:
            self._writer.write(control.request(msg_id, op, args))
            while True:
                for message in self._lines.feed(b""):
                    return self._result(message)
                data = await asyncio.wait_for(self._reader.read(1 << 16), PEER_TIMEOUT)
                if not data:
                    raise PeerError(f"peer {self.address} closed the connection without an answer")
                for message in self._lines.feed(data):
                    return self._result(message)
        except (OSError, asyncio.TimeoutError, control.ControlError) as err:
            raise PeerError(f"peer {self.address}: {err or type(err).__name__}") from None

    def _result(self, message: dict) -> dict:
        if not message.get("ok"):
            raise PeerError(f"peer {self.address}: {message.get('error')}")
        return message.get("result", {})

    async def write_pages(self, vm: str, migration: str, ram: GuestRam, pages: Iterable[int]) -> int:
        """Copy ``pages`` of ``ram`` into the peer's VM ``vm``, a batch per
        request, each with its CRC-32."""
        pages = sorted(set(pages))
        for i in range(0, len(pages), control.PAGES_PER_WRITE):
            batch = pages[i:i + control.PAGES_PER_WRITE]
            data = ram.page_data(batch)
            await self.call("ram_write", vm=vm, migration=migration, pages=batch, data=data.hex(),
                            crc=zlib.crc32(data))
        return len(pages)

    async def differing_chunks(self, vm: str, migration: str, ram: GuestRam) -> list[int]:
        """Byte offsets of the chunks (a MiB each) where the peer's VM ``vm``
        has other guest RAM than ``ram``, by their CRC-32s."""
        theirs, mine = await self.call("ram_crcs", vm=vm, migration=migration), await asyncio.to_thread(ram.crcs)
        if theirs["chunk"] != COMPARE_CHUNK:
            raise PeerError(f"peer {self.address}: CRCs over {theirs['chunk']} bytes, not {COMPARE_CHUNK}")
        if theirs["size"] != ram.size:
            raise PeerError(f"peer {self.address}: {vm} has {theirs['size']} bytes of RAM, the source {ram.size}")
        return [i * theirs["chunk"] for i, (a, b) in enumerate(zip(mine, theirs["crcs"])) if a != b]


async def call(address: str, tls_dir: Path, op: str, **args) -> dict:
    """One request to the daemon at ``address``; its result, or PeerError."""
    async with Peer(address, tls_dir) as peer:
        return await peer.call(op, **args)
