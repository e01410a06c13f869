"""Daemon to daemon over TCP with TLS (qmpmig/daemon/peer.py), on real
daemons and certificates made by openssl: both ends prove who they are;
a peer without the right certificate gets nothing and injects nothing."""

import asyncio
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmpmig.daemon import client, peer

from test_daemon import stop_daemon


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(where: Path) -> tuple[Path, Path]:
    where.mkdir(parents=True, exist_ok=True)
    key, cert = where / "ca-key.pem", where / "ca-cert.pem"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=qmpmig test CA {where.name}")
    return key, cert


def make_cert(where: Path, ca: tuple[Path, Path], role: str, cn: str, san: str) -> None:
    key, csr, cert = where / f"{role}-key.pem", where / f"{role}.csr", where / f"{role}-cert.pem"
    ext = where / f"{role}.ext"
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={'serverAuth' if role == 'server' else 'clientAuth'}\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext))


def credentials(where: Path, ca: tuple[Path, Path], trust: Path | None = None) -> Path:
    """A TLS directory: certificates signed by ``ca``, trusting ``trust``'s
    CA certificate (``ca``'s own by default)."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "ca-cert.pem").write_bytes((trust or ca[1]).read_bytes())
    make_cert(where, ca, "server", f"daemon-{where.name}", "IP:127.0.0.1,DNS:localhost")
    make_cert(where, ca, "client", f"daemon-{where.name}", f"DNS:{where.name}")
    return where


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    top = tmp_path_factory.mktemp("pki")
    good_ca, rogue_ca = make_ca(top / "good-ca"), make_ca(top / "rogue-ca")
    return {"host-a": credentials(top / "host-a", good_ca), "host-b": credentials(top / "host-b", good_ca),
            # signed by another CA, though it trusts ours: it can check our
            # daemon, our daemon will not take it
            "intruder": credentials(top / "intruder", rogue_ca, trust=good_ca[1]),
            # a daemon that is not who it says (another CA's server certificate)
            "impostor": credentials(top / "impostor", rogue_ca)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def daemon(tmp_path, pki):
    """``qmpmig daemon --listen`` with host-b's credentials: its address."""
    started = []

    def start(tls: Path) -> str:
        run_dir, address = tmp_path / f"run-{len(started)}", f"127.0.0.1:{free_port()}"
        proc = subprocess.Popen([sys.executable, "-m", "qmpmig", "daemon", "--run-dir", str(run_dir),
                                 "--listen", address, "--tls-dir", str(tls)],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "daemon.log", "ab"))
        started.append((run_dir, proc))
        deadline = time.monotonic() + 20
        while not (run_dir / "daemon.pid").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.05)
        return address

    yield start
    for run_dir, proc in started:
        stop_daemon(run_dir)
        proc.wait(20)


def test_a_peer_with_the_right_certificate_is_answered(daemon, pki):
    address = daemon(pki["host-b"])
    status = asyncio.run(peer.call(address, pki["host-a"], "status"))
    assert status["pid"] > 0 and status["vms"] == []


def test_a_peer_may_ask_only_what_peers_may(daemon, pki):
    address = daemon(pki["host-b"])
    with pytest.raises(peer.PeerError, match="no such request: 'shutdown'"):
        asyncio.run(peer.call(address, pki["host-a"], "shutdown"))
    with pytest.raises(peer.PeerError, match="no such request: 'attach'"):
        asyncio.run(peer.call(address, pki["host-a"], "attach", name="x", qmp="/x", devices=["/y"]))
    assert asyncio.run(peer.call(address, pki["host-a"], "status"))["pid"] > 0, "the daemon still serves"


def test_an_incoming_migration_announced_by_a_peer_is_expected_locally(daemon, pki, tmp_path):
    address = daemon(pki["host-b"])
    asyncio.run(peer.call(address, pki["host-a"], "expect", domain="guest1", migration="m-1"))
    run_dir = tmp_path / "run-0"
    assert asyncio.run(client.call(run_dir, "expected", domain="guest1", migration="m-1")) == {"expected": True}


def test_a_peer_whose_certificate_another_ca_signed_gets_nothing(daemon, pki):
    address = daemon(pki["host-b"])
    with pytest.raises(peer.PeerError):
        asyncio.run(peer.call(address, pki["intruder"], "status"))


def test_a_peer_without_a_certificate_gets_nothing(daemon, pki):
    address = daemon(pki["host-b"])
    host, port = peer.split_address(address)
    context = ssl.create_default_context(cafile=str(pki["host-b"] / "ca-cert.pem"))

    async def anonymous() -> bytes:
        reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=host)
        writer.write(b'{"id":1,"op":"status","args":{}}\n')
        try:
            return await asyncio.wait_for(reader.read(1 << 16), 10)
        finally:
            writer.close()

    try:
        answer = asyncio.run(anonymous())
    except (ssl.SSLError, ConnectionError):
        answer = b""
    assert answer == b"", answer


def test_a_daemon_that_cannot_prove_who_it_is_is_not_talked_to(daemon, pki):
    address = daemon(pki["impostor"])
    with pytest.raises(peer.PeerError, match="certificate verify failed"):
        asyncio.run(peer.call(address, pki["host-a"], "expect", domain="guest1", migration="m-2"))


def test_missing_credentials_are_named(tmp_path):
    with pytest.raises(peer.PeerError, match="ca-cert.pem"):
        peer.context(tmp_path, "client")
