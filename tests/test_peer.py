"""Daemon to daemon over TCP with TLS (qmpmig/daemon/peer.py), on real
daemons and certificates made by openssl: both ends prove who they are;
a peer without the right certificate gets nothing and injects nothing."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from qmpmig.controller.peerside import PeerRam
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


def test_a_request_bounded_by_its_caller_gives_a_hung_peer_up(daemon, pki, tmp_path):
    """``Peer.call(within=...)``: a daemon that took the connection and then
    hung (SIGSTOP: its kernel still acknowledges) fails the request at the
    caller's bound, not CALL_TIMEOUT, and the connection is given up."""
    address = daemon(pki["host-b"])
    pid = int((tmp_path / "run-0" / "daemon.pid").read_text())

    async def ask() -> tuple[float, str, str]:
        async with peer.Peer(address, pki["host-a"]) as connection:
            await connection.call("status")
            os.kill(pid, signal.SIGSTOP)
            try:
                start = time.monotonic()
                with pytest.raises(peer.PeerError) as first:
                    await connection.call("status", within=1.0)
                took = time.monotonic() - start
                with pytest.raises(peer.PeerError) as later:
                    await connection.call("status")
            finally:
                os.kill(pid, signal.SIGCONT)
        return took, str(first.value), str(later.value)

    took, first, later = asyncio.run(ask())
    assert 1.0 <= took < 5.0 and "no answer within 1.0 s" in first, (took, first)   # not CALL_TIMEOUT
    assert later == first, "a connection given up answers every later request with why"


def test_strangers_that_never_finish_a_handshake_hold_at_most_max_peer_sockets(daemon, pki, tmp_path):
    """Connections to the peer port that send nothing: past
    peer.MAX_PEER_SOCKETS of them a new one (a real peer's too) is closed
    at once, so the daemon's file descriptors stay its VMs'; its control
    socket serves meanwhile, and peers are answered once the strangers go."""
    address = daemon(pki["host-b"])
    run_dir = tmp_path / "run-0"
    pid = int((run_dir / "daemon.pid").read_text())
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))
    host, port = peer.split_address(address)
    strangers = [socket.create_connection((host, port)) for _ in range(peer.MAX_PEER_SOCKETS + 20)]
    try:
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{pid}/fd")) < fds_before + peer.MAX_PEER_SOCKETS:
            assert time.monotonic() < deadline, "the daemon did not take the strangers' connections"
            time.sleep(0.05)
        with pytest.raises(peer.PeerError):
            asyncio.run(peer.call(address, pki["host-a"], "status"))
        assert asyncio.run(client.call(run_dir, "status"))["pid"] == pid
        time.sleep(0.5)
        held = len(os.listdir(f"/proc/{pid}/fd")) - fds_before
        assert held <= peer.MAX_PEER_SOCKETS, f"{held} descriptors for {len(strangers)} strangers"
    finally:
        for stranger in strangers:
            stranger.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert asyncio.run(peer.call(address, pki["host-a"], "status"))["pid"] == pid
            break
        except peer.PeerError:
            assert time.monotonic() < deadline, "peers are still refused once the strangers left"
            time.sleep(0.1)


def test_an_incoming_migration_announced_by_a_peer_is_expected_locally(daemon, pki, tmp_path):
    address = daemon(pki["host-b"])
    asyncio.run(peer.call(address, pki["host-a"], "expect", domain="guest1", migration="m-1"))
    run_dir = tmp_path / "run-0"
    assert asyncio.run(client.call(run_dir, "expected", domain="guest1", migration="m-1")) == {"expected": True}


def test_a_peer_whose_certificate_another_ca_signed_gets_nothing(daemon, pki):
    address = daemon(pki["host-b"])
    with pytest.raises(peer.PeerError, match="does its CA sign this host's client certificate"):
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


# -- guest pages between hosts --------------------------------------------------


@pytest.fixture
def incoming_vm(daemon, pki, tmp_path, guest_image):
    """A destination VM (QEMU waiting with -incoming defer, a reference
    device) attached to a listening daemon: (address, run dir, its RAM)."""
    from qmpmig.qemu.guestmem import GuestRam
    from qmpmig.rig.processes import DeviceProcess
    from qmpmig.rig.vm import Vm

    address = daemon(pki["host-b"])
    run_dir = tmp_path / "run-0"
    vm = Vm("guest1", "destination", workdir=tmp_path, memory_mib=64).start()
    dev = DeviceProcess(tmp_path / "dev.sock", "--state-size", "1M").start()
    ram = GuestRam(vm.ram_path)
    try:
        asyncio.run(client.call(run_dir, "attach", name="guest1", qmp=str(vm.qmp_path), ram=str(vm.ram_path),
                                devices=[str(dev.socket)]))
        yield address, run_dir, ram
    finally:
        ram.close()
        dev.close()
        vm.close()


def source_ram(tmp_path: Path, pages: dict[int, bytes], size: int) -> "GuestRam":
    from qmpmig.qemu.guestmem import GuestRam
    path = tmp_path / "source.ram"
    path.write_bytes(bytes(size))
    ram = GuestRam(path)
    for page, fill in pages.items():
        ram.mem[page * 4096:(page + 1) * 4096] = fill * 4096
    return ram


@pytest.mark.qemu
def test_pages_from_the_source_host_land_in_the_expected_vm(incoming_vm, pki, tmp_path):
    address, run_dir, dst_ram = incoming_vm
    # More pages than one request carries, with a few the destination had
    # already: they must all arrive, and the CRCs then agree everywhere.
    pages = {p: bytes([p % 251 + 1]) for p in range(1000, 1000 + 150)}
    src_ram = source_ram(tmp_path, pages, dst_ram.size)
    dst_ram.mem[:] = src_ram.mem[:]
    for page in pages:
        dst_ram.mem[page * 4096:(page + 1) * 4096] = bytes(4096)

    async def go():
        async with peer.Peer(address, pki["host-a"]) as p:
            await p.call("expect", domain="guest1", migration="m-7")
            there = PeerRam(p.bound(vm="guest1", migration="m-7"))
            (unit, before), sent = await there.differing(src_ram), await there.receive(src_ram, pages)
            return unit, before, sent, (await there.differing(src_ram))[1]

    unit, before, sent, after = asyncio.run(go())
    assert unit == 1 << 20
    assert before == sorted({(page * 4096 >> 20) << 20 for page in pages})   # the MiBs the pages are in
    assert sent == 150 and after == []
    assert dst_ram.differing_pages(src_ram) == []
    src_ram.close()


@pytest.mark.qemu
@pytest.mark.parametrize("case", ["not expected", "another migration", "bad crc", "outside RAM", "intruder"])
def test_pages_that_may_not_be_written_are_not(incoming_vm, pki, tmp_path, case):
    address, run_dir, dst_ram = incoming_vm
    before = dst_ram.crcs()
    data = b"\x5a" * 4096
    args = dict(vm="guest1", migration="m-8", pages=[2000], data=data.hex(), crc=zlib.crc32(data))
    if case == "another migration":
        args["migration"] = "m-9"
    if case == "bad crc":
        args["crc"] ^= 1
    if case == "outside RAM":
        args["pages"] = [dst_ram.size // 4096]

    async def go():
        if case != "not expected":
            await peer.call(address, pki["host-a"], "expect", domain="guest1", migration="m-8")
        await peer.call(address, pki["intruder" if case == "intruder" else "host-a"], "ram_write", **args)

    with pytest.raises(peer.PeerError) as err:
        asyncio.run(go())
    expected = {"not expected": "no incoming migration m-8", "another migration": "no incoming migration m-9",
                "bad crc": "nothing written", "outside RAM": "outside the guest", "intruder": ""}[case]
    assert expected in str(err.value)
    assert dst_ram.crcs() == before, "the destination's RAM changed"
    # The daemon still serves, and libvirt's hook can still admit the migration once.
    assert asyncio.run(peer.call(address, pki["host-a"], "status"))["vms"][0]["name"] == "guest1"


@pytest.mark.qemu
def test_a_peer_gets_at_most_max_in_flight_requests_answered_at_once(incoming_vm, pki):
    """One more long poll than peer.MAX_IN_FLIGHT on one connection: the
    last is read only once one of the others was answered (each held
    peer.LONG_POLL_MAX), and every one is answered."""
    address, run_dir, dst_ram = incoming_vm

    async def go() -> list[float]:
        async with peer.Peer(address, pki["host-a"]) as p:
            await p.call("expect", domain="guest1", migration="m-11")
            since = (await p.call("incoming_watch", vm="guest1", migration="m-11", since=-1, timeout=0))["updates"]
            t0 = time.monotonic()

            async def poll() -> float:
                await p.call("incoming_watch", vm="guest1", migration="m-11", since=since,
                             timeout=peer.LONG_POLL_MAX)
                return time.monotonic() - t0
            return sorted(await asyncio.gather(*(poll() for _ in range(peer.MAX_IN_FLIGHT + 1))))

    answered = asyncio.run(go())
    assert answered[-2] < peer.LONG_POLL_MAX + 1.5, answered
    assert answered[-1] > answered[-2] + peer.LONG_POLL_MAX / 2, answered
    assert asyncio.run(peer.call(address, pki["host-a"], "status"))["pid"] > 0, "the daemon still serves"


# -- a migration to the daemon of another host ----------------------------------


def start_daemon(run_dir: Path, tls: Path, listen: str | None, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "qmpmig", "daemon", "--run-dir", str(run_dir), "--tls-dir", str(tls)]
    proc = subprocess.Popen(argv + (["--listen", listen] if listen else []), stdout=subprocess.DEVNULL,
                            stderr=open(log, "ab"))
    deadline = time.monotonic() + 20
    while not (run_dir / "daemon.pid").exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return proc


def cli(run_dir: Path, *argv: str, timeout: float = 180) -> dict:
    """The command's JSON result; ``{"error": stderr}`` if it gave none."""
    done = subprocess.run([sys.executable, "-m", "qmpmig", *argv, "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=timeout)
    return json.loads(done.stdout) if done.stdout else {"error": done.stderr}


@pytest.fixture
def two_hosts(tmp_path, pki, guest_image):
    """Host A's daemon with the source VM (its device doing DMA), host B's
    listening daemon with the destination VM: the two only meet over TLS."""
    from qmpmig.rig.processes import DeviceProcess
    from qmpmig.rig.vm import DMA_WINDOW, Vm

    address = f"127.0.0.1:{free_port()}"
    runs = {"a": tmp_path / "run-a", "b": tmp_path / "run-b"}
    procs = []
    src = Vm("g0", "source", workdir=tmp_path).start()
    dst = Vm("g1", "destination", workdir=tmp_path).start()
    devices = [DeviceProcess(tmp_path / f"{vm}.sock", "--state-size", "16M").start() for vm in ("g0", "g1")]
    try:
        src.wait_heartbeat(1, 60)

        def hosts(a_tls: Path) -> tuple[dict, str]:
            procs.append(start_daemon(runs["a"], a_tls, None, tmp_path / "a.log"))
            procs.append(start_daemon(runs["b"], pki["host-b"], address, tmp_path / "b.log"))
            asyncio.run(client.call(runs["a"], "attach", name="g0", qmp=str(src.qmp_path), ram=str(src.ram_path),
                                    devices=[str(devices[0].socket)],
                                    start_ring=[DMA_WINDOW[0], DMA_WINDOW[1]]))
            asyncio.run(client.call(runs["b"], "attach", name="g1", qmp=str(dst.qmp_path), ram=str(dst.ram_path),
                                    devices=[str(devices[1].socket)]))
            return runs, address

        yield hosts, src, dst, tmp_path
    finally:
        for run_dir in runs.values():
            stop_daemon(run_dir)
        for proc in procs:
            proc.wait(20)
        for device in devices:
            device.close()
        src.close()
        dst.close()


@pytest.mark.qemu
def test_a_migration_to_another_hosts_daemon(two_hosts, pki):
    hosts, src, dst, tmp = two_hosts
    runs, address = hosts(pki["host-a"])
    result = cli(runs["a"], "migrate", "--src", "g0", "--dst", f"g1@{address}", "--uri",
                 f"unix:{tmp / 'mig.sock'}", "--verify-ram", "--trace", str(tmp / "trace.jsonl"), "--json")
    assert result["ok"] and result["trace_violations"] == [], result
    assert result["guest_on"] == "destination" and result["dma_pages_copied"] > 0
    device = result["devices"]["dev0"]
    assert device["compared"] and device["src_hash"] == device["dst_hash"]
    records = [json.loads(line) for line in (tmp / "trace.jsonl").read_text().splitlines()]
    verified = [r for r in records if r["kind"] == "ram_verify"]
    assert verified and verified[-1]["unit"] == 1 << 20 and verified[-1]["differing"] == 0
    # Host B's states came through the channel into host A's trace.
    assert ("dst", "dev0", "RUNNING") in {(r["side"], r["device"], r["to"]) for r in records
                                          if r["kind"] == "device_state"}
    dst.wait_heartbeat(src.last_heartbeat(), 30)
    # B owns the destination's device, A none: the device goes on with its DMA at B.
    a, b = (asyncio.run(client.call(runs[h], "status")) for h in "ab")
    assert a["vms"] == [] and [vm["name"] for vm in b["vms"]] == ["g1"] and not b["vms"][0]["busy"]
    first = b["vms"][0]["devices"][0]
    time.sleep(0.5)
    again = asyncio.run(client.call(runs["b"], "status"))["vms"][0]["devices"][0]
    assert again["state"] == "RUNNING" and again["dma_seq"] > first["dma_seq"] and again["client_losses"] == 0


@pytest.mark.qemu
def test_a_source_host_without_the_right_certificate_gets_nowhere(two_hosts, pki):
    hosts, src, dst, tmp = two_hosts
    runs, address = hosts(pki["intruder"])
    result = cli(runs["a"], "migrate", "--src", "g0", "--dst", f"g1@{address}", "--uri",
                 f"unix:{tmp / 'mig.sock'}", "--json")
    assert not result.get("ok") and "peer" in json.dumps(result), result
    src.wait_heartbeat(src.last_heartbeat(), 30)
    a, b = (asyncio.run(client.call(runs[h], "status")) for h in "ab")
    assert [vm["name"] for vm in a["vms"]] == ["g0"] and a["vms"][0]["devices"][0]["state"] == "RUNNING"
    assert b["vms"][0]["runstate"] == "inmigrate" and not b["vms"][0]["busy"]


# -- the control protocol's payloads (sans I/O) ----------------------------------


def test_a_payload_follows_its_request_raw_and_arrives_as_its_data():
    from qmpmig.daemon import control
    blob = bytes(range(256)) * 40 + b"\n\n{"          # newlines and braces inside are only bytes
    wire = control.request(1, "ram_write", {"crc": 7}, blob) + control.request(2, "status", {})
    reader, out = control.LineReader(), []
    for i in range(0, len(wire), 97):                   # any split of the stream
        out += reader.feed(wire[i:i + 97])
    assert out == [{"id": 1, "op": "ram_write", "args": {"crc": 7, "data": blob}},
                   {"id": 2, "op": "status", "args": {}}]


@pytest.mark.parametrize("line", [b'{"id":1,"op":"x","args":{},"payload":-1}\n',
                                  b'{"id":1,"op":"x","args":{},"payload":"9"}\n',
                                  b'{"id":1,"op":"x","args":{},"payload":%d}\n' % ((8 << 20) + 1)])
def test_a_payload_that_cannot_be_is_refused(line):
    from qmpmig.daemon import control
    with pytest.raises(control.ControlError, match="payload"):
        control.LineReader().feed(line)


PHASES = ("setup", "precopy", "grace", "stop-copy", "switchover", "resume")


def migrating_in(phase: str, runs: dict, address: str, tmp: Path) -> subprocess.Popen | None:
    """``qmpmig migrate`` of g0 to B's g1 under way (the command running),
    once host A's daemon says the migration is in ``phase``; None if it
    ended before getting there."""
    argv = [sys.executable, "-m", "qmpmig", "migrate", "--src", "g0", "--dst", f"g1@{address}", "--uri",
            f"unix:{tmp / 'mig.sock'}", "--json", "--run-dir", str(runs["a"]), "--trace", str(tmp / "trace.jsonl")]
    command = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, seen = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        migrations = asyncio.run(client.call(runs["a"], "migrations"))["migrations"]
        if migrations and migrations[0]["phase"] == phase:
            return command
        if not migrations and seen:
            return None
        seen = seen or migrations
        time.sleep(0.002)
    raise AssertionError(f"no {phase} within 60 s")


def b_holds_nothing_of_the_attempt(runs: dict, dst) -> None:
    """After a failed attempt the destination QEMU has ended (no second copy
    of the guest may ever run) and B's daemon, once it sees it gone, holds
    neither it nor a migration."""
    dst.proc.wait(20)
    deadline = time.monotonic() + 10
    while (b := asyncio.run(client.call(runs["b"], "status")))["vms"] or b["migrations"]:
        assert time.monotonic() < deadline, b
        time.sleep(0.1)


@pytest.mark.qemu
@pytest.mark.parametrize("phase", PHASES)
def test_the_destination_hosts_daemon_killed_in_any_phase(two_hosts, pki, phase, fault_cell):
    """Host B's daemon SIGKILLed in each phase: its devices lose their
    client (and so reset) with it; before the switchover the guest runs on
    at the source with its device RUNNING, never reset, and the command
    says the peer went away (exit 1); B's QEMU, its monitor gone with the
    daemon, is left to whoever runs B (it was asked to listen, so it holds
    no more than a half-loaded copy, never started)."""
    hosts, src, dst, tmp = two_hosts
    runs, address = hosts(pki["host-a"])
    command = migrating_in(phase, runs, address, tmp)
    if command is None:
        pytest.skip(f"the migration was through before {phase}")
    os.kill(int((runs["b"] / "daemon.pid").read_text()), signal.SIGKILL)
    fault_cell.fault()
    out, err = command.communicate(timeout=120)
    ended = time.monotonic()
    result = json.loads(out)
    if result["ok"]:
        pytest.skip(f"the migration was through before the kill landed in {phase}")
    fault_cell.outcome("destination host's daemon SIGKILL", phase, result["guest_on"], ended, result["message"],
                       exit=command.returncode)
    assert "peer" in result["message"], result
    if result["guest_on"] == "source":
        assert command.returncode == 1
        src.wait_heartbeat(src.last_heartbeat(), 30)
        a = asyncio.run(client.call(runs["a"], "status"))
        assert a["migrations"] == [] and a["vms"][0]["devices"][0]["state"] == "RUNNING"
        assert a["vms"][0]["runstate"] == "running" and a["vms"][0]["devices"][0]["client_losses"] == 0
        assert dst.last_heartbeat() == 0, "the destination ran the guest"
    else:
        assert phase in ("switchover", "resume") and command.returncode == 3, result


@pytest.mark.qemu
@pytest.mark.parametrize("phase", PHASES)
def test_the_source_hosts_daemon_killed_in_any_phase(two_hosts, pki, phase, fault_cell):
    """Host A's daemon (the controller's) SIGKILLed in each phase, then
    ``qmpmig recover`` at A: the guest goes on at the source in every
    phase (the new daemon cannot know whether B's devices loaded: the
    journal's rule gives the source) and the destination never runs it;
    the recovery says that B's daemon (named) keeps its destination,
    paused and never started."""
    hosts, src, dst, tmp = two_hosts
    runs, address = hosts(pki["host-a"])
    command = migrating_in(phase, runs, address, tmp)
    if command is None:
        pytest.skip(f"the migration was through before {phase}")
    os.kill(int((runs["a"] / "daemon.pid").read_text()), signal.SIGKILL)
    fault_cell.fault()
    command.communicate(timeout=30)
    done = subprocess.run([sys.executable, "-m", "qmpmig", "recover", "--json", "--run-dir", str(runs["a"])],
                          capture_output=True, text=True, timeout=120)
    recovered = json.loads(done.stdout)
    assert len(recovered) == 1, recovered
    on_dst = recovered[0]["ok"]
    winner = dst if on_dst else src
    winner.wait_heartbeat(winner.last_heartbeat(), 30)
    fault_cell.outcome("source host's daemon SIGKILL, then qmpmig recover", phase,
                       "destination" if on_dst else "source", time.monotonic(), recovered[0]["message"])
    assert not on_dst and f"the daemon at {address}" in recovered[0]["message"], recovered
    assert dst.last_heartbeat() == 0, "the destination ran the guest"


@contextlib.contextmanager
def daemon_stopped_in(phase: str, two_hosts, pki, host: str, fault_cell):
    """``qmpmig migrate`` across hosts under way in ``phase``, with
    ``host``'s daemon SIGSTOPped until the block ends (then SIGCONT):
    (run dirs, source VM, destination VM, the command)."""
    hosts, src, dst, tmp = two_hosts
    runs, address = hosts(pki["host-a"])
    command = migrating_in(phase, runs, address, tmp)
    if command is None:
        pytest.skip(f"the migration was through before {phase}")
    daemon = int((runs[host] / "daemon.pid").read_text())
    os.kill(daemon, signal.SIGSTOP)
    fault_cell.fault()
    try:
        yield runs, src, dst, command
    finally:
        os.kill(daemon, signal.SIGCONT)


@pytest.mark.qemu
@pytest.mark.parametrize("phase", PHASES)
def test_the_source_hosts_daemon_hung_in_any_phase(two_hosts, pki, phase, fault_cell):
    """Host A's daemon SIGSTOPped in each phase: its connection stays open
    and only its silence tells.  B takes it for lost within
    peer.PEER_SILENCE of its last request (a long poll under way does not
    hold B: peer.LONG_POLLS), ends what it holds of the attempt and says so;
    once A's daemon is let go on (SIGCONT) it finds its peer gone and the
    guest runs on at the source, never at B."""
    with daemon_stopped_in(phase, two_hosts, pki, "a", fault_cell) as (runs, src, dst, command):
        deadline = time.monotonic() + peer.PEER_SILENCE + 10
        while not (lost := asyncio.run(client.call(runs["b"], "status"))["peers_lost"]):
            assert time.monotonic() < deadline, "B never took its hung peer for lost"
            time.sleep(0.1)
        b_over = time.monotonic() - fault_cell.landed
    assert "asked nothing" in lost[0]["why"], lost
    assert b_over < peer.PEER_SILENCE + 4, f"B took {b_over:.1f} s to see its peer silent"
    out, err = command.communicate(timeout=120)
    result = json.loads(out) if out else {"error": err}
    if result.get("ok"):
        pytest.skip(f"the migration was through before the stop landed in {phase}")
    src.wait_heartbeat(src.last_heartbeat(), 30)
    fault_cell.outcome("source host's daemon SIGSTOP, then SIGCONT once B gave it up", phase,
                       result.get("guest_on"), time.monotonic(), result.get("message", ""), b_over_s=round(b_over, 2),
                       b_outcome=lost[0]["outcome"])
    assert result["guest_on"] == "source" and command.returncode == 1, result
    assert "peer" in result["message"], result
    assert dst.last_heartbeat() == 0, "the destination ran the guest"
    a = asyncio.run(client.call(runs["a"], "status"))
    assert a["migrations"] == [] and a["vms"][0]["runstate"] == "running", a
    assert a["vms"][0]["devices"][0]["state"] == "RUNNING", a


@pytest.mark.qemu
@pytest.mark.parametrize("phase", PHASES)
def test_the_destination_hosts_daemon_hung_in_any_phase(two_hosts, pki, phase, fault_cell):
    """Host B's daemon SIGSTOPped in each phase: its kernel still
    acknowledges, so the link looks alive; A's requests go unanswered.  The
    migration fails at A's first bound (a device request's timeout, or,
    with the guest paused, --max-pause for every request, QMP and guest
    pages too: Walker.paused_deadline), the guest runs on at the source
    with its device RUNNING, and the destination never runs it; let go on,
    B finds its peer gone and ends its side."""
    with daemon_stopped_in(phase, two_hosts, pki, "b", fault_cell) as (runs, src, dst, command):
        out, err = command.communicate(timeout=120)
        ended = time.monotonic()
    result = json.loads(out) if out else {"error": err}
    if result.get("ok"):
        pytest.skip(f"the migration was through before the stop landed in {phase}")
    src.wait_heartbeat(src.last_heartbeat(), 30)
    fault_cell.outcome("destination host's daemon SIGSTOP", phase, result.get("guest_on"), ended,
                       result.get("message", ""), exit=command.returncode, paused_s=result.get("downtime_s"))
    assert result["guest_on"] == "source" and command.returncode == 1, result
    # The first request that misses its bound (a long poll's hold and
    # LONG_POLL_GRACE, --max-pause while paused) gives the peer up.
    assert ended - fault_cell.landed < 20, f"A took {ended - fault_cell.landed:.1f} s"
    a = asyncio.run(client.call(runs["a"], "status"))
    assert a["migrations"] == [] and a["vms"][0]["runstate"] == "running", a
    assert a["vms"][0]["devices"][0]["state"] == "RUNNING", a
    deadline = time.monotonic() + 20
    while (b := asyncio.run(client.call(runs["b"], "status")))["migrations"] or any(vm["busy"] for vm in b["vms"]):
        assert time.monotonic() < deadline, f"B still holds the attempt: {b}"
        time.sleep(0.1)
    assert dst.last_heartbeat() == 0, "the destination ran the guest"


@pytest.mark.qemu
@pytest.mark.parametrize("how", ["flip", "truncate", "reorder", "duplicate", "replay"])
def test_a_spoilt_device_stream_across_hosts_is_refused_and_the_source_runs_on(two_hosts, pki, how):
    """The device stream bent at host A before it crosses (``--debug
    spoil-HOW``; the channel's CRC-32 covers the bent bytes, so only the
    device's own checks stand between it and the guest): B's device refuses
    it every time, the command exits 1 naming that device, the guest runs
    on at A with its device RUNNING, and B's QEMU is ended."""
    hosts, src, dst, tmp = two_hosts
    runs, address = hosts(pki["host-a"])
    done = subprocess.run([sys.executable, "-m", "qmpmig", "migrate", "--src", "g0", "--dst", f"g1@{address}",
                           "--uri", f"unix:{tmp / 'mig.sock'}", "--debug", f"spoil-{how}", "--json",
                           "--run-dir", str(runs["a"])], capture_output=True, text=True, timeout=180)
    result = json.loads(done.stdout)
    assert done.returncode == 1 and not result["ok"] and result["guest_on"] == "source", result
    assert "dst device dev0" in result["message"] and result["trace_violations"] == [], result
    src.wait_heartbeat(src.last_heartbeat(), 30)
    a = asyncio.run(client.call(runs["a"], "status"))
    assert a["vms"][0]["devices"][0]["state"] == "RUNNING" and a["vms"][0]["devices"][0]["client_losses"] == 0
    dst.proc.wait(20)
    assert dst.last_heartbeat() == 0
