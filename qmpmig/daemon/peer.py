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
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from ..errors import QmpmigError
from . import control

#: libvirt's (and QEMU's default) directory for migration certificates.
DEFAULT_TLS_DIR = Path("/etc/pki/qemu")
#: The requests a peer daemon may make.
PEER_OPS = frozenset({"status", "migrations", "expect", "expected"})
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


async def call(address: str, tls_dir: Path, op: str, **args) -> dict:
    """One request to the daemon at ``address``; its result, or PeerError."""
    host, port = split_address(address)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context(tls_dir, "client"), server_hostname=host), PEER_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as err:
        raise PeerError(f"peer {address}: {err or type(err).__name__}") from None
    try:
        writer.write(control.request(1, op, args))
        lines = control.LineReader()
        while True:
            data = await asyncio.wait_for(reader.read(1 << 16), PEER_TIMEOUT)
            if not data:
                raise PeerError(f"peer {address} closed the connection without an answer")
            for message in lines.feed(data):
                if not message.get("ok"):
                    raise PeerError(f"peer {address}: {message.get('error')}")
                return message.get("result", {})
    except (OSError, asyncio.TimeoutError, control.ControlError) as err:
        raise PeerError(f"peer {address}: {err or type(err).__name__}") from None
    finally:
        writer.close()
