"""qmpmig against a real peer it did not write: libvfio-user's sample
server (third_party/, built by scripts/setup.sh), the library most vfio-user
devices outside QEMU are built on.  Each tolerance PROTOCOL.md lists is
shown here against the library itself."""

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmpmig.controller import Options
from qmpmig.errors import ErrorReply
from qmpmig.migration.states import MigFlags, MigState
from qmpmig.rig.launch import LaunchOptions, launch
from qmpmig.rig.processes import DeviceProcess
from qmpmig.rig.vm import Vm
from qmpmig.vfio_user.client import Client
from qmpmig.vfio_user.codec import HEADER, Command, HeaderFlags

from test_daemon import qmpmig, stop_daemon

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "build/libvfio-user/build/samples/server"
#: BAR1 of the sample server, patched to a power of two by the build.
BAR1_SIZE = 0x4000


@pytest.fixture(scope="session")
def sample_server():
    """Built by scripts/setup.sh: its absence fails the test, not skips it."""
    if not os.access(SERVER, os.X_OK):
        pytest.fail(f"{SERVER} not built: run scripts/setup.sh (scripts/build-libvfio-user.sh)")
    return f"{SERVER} -v {{sock}}"


@pytest.fixture
def server(sample_server, tmp_path):
    started = []

    def start(name: str = "s") -> DeviceProcess:
        started.append(DeviceProcess(tmp_path / f"{name}.sock", command=sample_server).start())
        return started[-1]

    yield start
    for proc in started:
        proc.close()


def driver_writes() -> tuple[tuple[int, int, bytes], ...]:
    """What a driver of the sample device does before it migrates: BAR0
    holds the time its timer fires (the sample re-arms it when it runs again
    after a resume, and refuses a time in the past), BAR1 a pattern."""
    return ((0, 0, struct.pack("<q", int(time.time()) + 3600)), (1, 0, os.urandom(BAR1_SIZE)))


# -- the tolerances, against the library ------------------------------------------------

def raw_reply(path: Path, cmd: int, payload: bytes) -> tuple[int, int, bytes]:
    """One command on a raw connection after VERSION: the reply's flags,
    error_no and payload, as the server sent them."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        version = json.dumps({"capabilities": {"max_msg_fds": 1}}).encode() + b"\0"
        body = struct.pack("<HH", 0, 1) + version
        sock.sendall(HEADER.pack(1, Command.VERSION, HEADER.size + len(body), 0, 0) + body)
        replies = []
        for msg_id, frame in ((1, None), (2, HEADER.pack(2, cmd, HEADER.size + len(payload), 0, 0) + payload)):
            if frame:
                sock.sendall(frame)
            head = sock.recv(HEADER.size, socket.MSG_WAITALL)
            _, _, size, flags, error_no = HEADER.unpack(head)
            replies.append((flags, error_no, sock.recv(size - HEADER.size, socket.MSG_WAITALL) if size > HEADER.size
                            else b""))
    return replies[1]


async def test_an_error_reply_with_a_payload_is_taken_as_the_error(server):
    """libvfio-user answers a REGION_READ its device callback refuses (BAR0
    takes 8-byte accesses only) with an error reply that carries the
    reply's payload: the request fails with the server's errno and the
    connection goes on."""
    flags, error_no, payload = raw_reply(server("raw").socket, Command.REGION_READ, struct.pack("<QII", 0, 0, 4))
    assert flags & HeaderFlags.ERROR and error_no and payload, "the library no longer sends the payload"
    dev = server()
    client = await Client.connect(str(dev.socket))
    try:
        with pytest.raises(ErrorReply) as err:
            await client.region_read(0, 0, 4)
        assert err.value.errno == error_no
        assert (await client.device_info()).num_regions >= 9
    finally:
        await client.close()


async def test_a_data_read_reply_longer_than_its_size_field_gives_size_bytes(server):
    """libvfio-user's MIG_DATA_READ reply carries the whole buffer asked
    for while its size field says how much of it is data: the stream is
    BAR1 and BAR0 (16 KiB + 8 bytes) however large the reads are."""
    dev = server()
    client = await Client.connect(str(dev.socket))
    try:
        await client.set_device_state(MigState.STOP_COPY)
        pieces = []
        while piece := await client.mig_data_read(1 << 20):
            pieces.append(len(piece))
        assert pieces == [BAR1_SIZE + 8]
        await client.set_device_state(MigState.STOP)
    finally:
        await client.close()


# -- migrations with the library on both sides ------------------------------------------

async def test_launch_migrates_a_libvfio_user_device_pair(sample_server):
    """``migrate --launch --device-cmd`` with the sample server, STOP_COPY
    only (its pre-copy aborts the server on PRE_COPY -> RUNNING): the guest
    and the device move, the destination's BAR1 equals the source's at the
    stop, the destination device answers afterwards, and the summary says
    what the missing extensions left unverified."""
    opts = LaunchOptions(device_commands=(sample_server,), device_writes=driver_writes(),
                         controller=Options(device_flags=int(MigFlags.STOP_COPY), compare_regions=(1,)))
    report = await launch(opts)
    assert report.summary.ok, report.summary.message
    assert report.checks["dev0 state"] is None and report.checks["dev0 answers"] is None, report.checks
    assert not any(report.checks.values()), report.checks
    assert report.violations == []
    assert report.summary.device_bytes == BAR1_SIZE + 8
    assert report.summary.unverified == ["dev0: the stop-copy size was not known before reading it "
                                         "(no MIG_DATA_SIZE)"], report.summary.unverified
    states = [r["to"] for r in report.records if r["kind"] == "device_state" and r["side"] == "src"]
    assert "PRE_COPY" not in states and "STOP_COPY" in states


async def test_the_region_comparison_catches_a_destination_that_differs(sample_server):
    """Negative control: the destination device's BAR1 overwritten after
    the load (debug option) must fail the state check."""
    opts = LaunchOptions(device_commands=(sample_server,), device_writes=driver_writes(),
                         controller=Options(device_flags=int(MigFlags.STOP_COPY), compare_regions=(1,),
                                            debug=frozenset({"scribble-after-load"})))
    report = await launch(opts)
    assert report.checks["dev0 state"] and "!= source" in report.checks["dev0 state"], report.checks


def test_attach_mode_migrates_a_libvfio_user_device_pair(server, tmp_path, guest_image):
    """The same through the daemon, as a user runs it: attach both VMs,
    play the driver with ``qmpmig region``, migrate with the CLI."""
    run_dir = tmp_path / "run"
    src = Vm("src", "source", workdir=tmp_path).start()
    dst = Vm("dst", "destination", workdir=tmp_path).start()
    devices = [server("s"), server("d")]
    try:
        src.wait_heartbeat(1, 60)
        for name, vm, dev in (("src", src, devices[0]), ("dst", dst, devices[1])):
            done = qmpmig(run_dir, "attach", name, "--qmp", str(vm.qmp_path), "--ram", str(vm.ram_path),
                          "--device", str(dev.socket))
            assert done.returncode == 0, done.stderr
        for region, offset, data in driver_writes():
            done = qmpmig(run_dir, "region", "src", "dev0", str(region), str(offset), "--write", data.hex())
            assert done.returncode == 0, done.stderr
        pattern = qmpmig(run_dir, "region", "src", "dev0", "1", "0", "--read", str(BAR1_SIZE)).stdout.strip()
        trace = tmp_path / "trace.jsonl"
        done = qmpmig(run_dir, "migrate", "--src", "src", "--dst", "dst", "--uri", f"unix:{tmp_path / 'mig.sock'}",
                      "--device-flags", "STOP_COPY", "--compare-regions", "1", "--trace", str(trace), "--json")
        result = json.loads(done.stdout)
        assert done.returncode == 0 and result["ok"], (result, done.stderr)
        compared = result["devices"]["dev0"]
        assert compared["compared"] == "regions 1" and compared["src_hash"] == compared["dst_hash"]
        dst.wait_heartbeat(src.last_heartbeat(), 30)
        after = qmpmig(run_dir, "region", "dst", "dev0", "1", "0", "--read", str(BAR1_SIZE))
        assert after.returncode == 0 and after.stdout.strip() == pattern, after.stderr
        check = subprocess.run([sys.executable, "-m", "qmpmig", "trace", "check", str(trace)],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout
    finally:
        stop_daemon(run_dir)
        src.close()
        dst.close()


# -- qmpmig check against the library --------------------------------------------------------

def run_check(*argv: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "qmpmig", "check", "--json", *argv],
                          capture_output=True, text=True, timeout=90)
    return done, time.monotonic() - t0


def test_check_starts_the_sample_server_and_reports_what_it_gets_wrong(sample_server):
    """``--server-cmd``: a server started again whenever a connection needs
    one; well under 60 s, a row for every rule, and the sample's own faults
    named with the rule and how the server ended."""
    from qmpmig.tools.check import RULES
    done, seconds = run_check("--server-cmd", sample_server)
    assert done.returncode == 1 and seconds < 60, (done.stderr, seconds)
    report = json.loads(done.stdout)
    results = {r["id"]: r for r in report["results"]}
    assert list(results) == [rule.id for rule in RULES]
    # Its state machine aborts (assert) on arcs the uAPI allows.
    assert results["v2-arcs"]["status"] == "FAIL" and "SIGABRT" in results["v2-arcs"]["detail"]
    # Its pre-copy data and its stop-copy data overlap: the stream saved with
    # pre-copy is longer than what its destination takes.
    assert results["peer-resume"]["status"] == "FAIL" and "MIG_DATA_WRITE" in results["peer-resume"]["detail"]
    # It does not validate what it loads.
    assert results["peer-corrupt-resume"]["status"] == "FAIL"
    assert "accepted a stream" in results["peer-corrupt-resume"]["detail"]
    # What it does right is said too.
    for rule in ("dma-logging", "malformed"):
        assert results[rule]["status"] == "PASS", results[rule]
    assert all(r["status"] == "SKIP" for i, r in results.items() if i.startswith(("v1-", "ref-")))


def test_check_against_a_server_of_one_client_ends_and_says_why(server):
    """Without --server-cmd the sample serves the one connection and exits:
    check never hangs and never tracebacks; the rule that lost the device
    says how, the rules after it say they could not run."""
    dev = server()
    done, seconds = run_check("--socket", str(dev.socket))
    assert done.returncode == 1 and seconds < 60 and "Traceback" not in done.stderr, done.stderr
    results = json.loads(done.stdout)["results"]
    failed = [r for r in results if r["status"] == "FAIL"]
    assert failed and "cannot be brought back to RUNNING" in failed[0]["detail"], failed
    assert "--server-cmd" in failed[0]["detail"]
    assert all("no connection" in r["detail"] or "needs connections" in r["detail"]
               for r in results[results.index(failed[0]) + 1:] if r["status"] == "SKIP"
               and not r["id"].startswith(("v1-", "ref-", "peer-")))
