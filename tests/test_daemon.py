"""``qmpmig daemon``, the devices' owner: its control socket, and a
migration asked of it by a ``qmpmig`` command that then exits, on real
QEMU and real device processes."""

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qmpmig.controller.devices import RemoteDevice
from qmpmig.daemon import client, control
from qmpmig.device import records
from qmpmig.device.bar0 import read_register
from qmpmig.rig.processes import DeviceProcess
from qmpmig.rig.vm import DMA_WINDOW, Vm


def qmpmig(run_dir: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qmpmig", *argv, "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_dir(tmp_path):
    """A run directory of its own; whatever daemon started there is ended."""
    path = tmp_path / "run"
    yield path
    stop_daemon(path)


@pytest.fixture
def public_run_dir():
    """A run directory another uid can reach (pytest's tmp_path is 0700)."""
    top = Path(tempfile.mkdtemp(prefix="qmpmig-test-", dir="/tmp"))
    os.chmod(top, 0o711)
    yield top / "run"
    stop_daemon(top / "run")
    shutil.rmtree(top, ignore_errors=True)


def stop_daemon(path: Path) -> None:
    """Ask the daemon of ``path`` to stop; SIGKILL it if it has not after 20 s."""
    pid_file = path / "daemon.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    qmpmig(path, "daemon", "--stop", timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running, not a zombie (a daemon this process started stays its child)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_one_daemon_per_run_directory_and_only_a_directory_of_its_own(tmp_path, run_dir):
    """Two daemons never serve one run directory (its lock decides, not a
    race on the socket); a run directory that is a symbolic link, or whose
    parent other users may change, is refused before anything is made."""
    asyncio.run(client.ensure_daemon(run_dir))
    second = qmpmig(run_dir, "daemon", timeout=30)
    assert second.returncode == 1 and f"another qmpmig daemon serves {run_dir}" in second.stderr, second
    assert asyncio.run(client.running(run_dir))
    link = tmp_path / "link"
    link.symlink_to(run_dir)
    done = qmpmig(link, "daemon", timeout=30)
    assert done.returncode == 1 and "not a directory of uid" in done.stderr, done
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    done = qmpmig(shared / "run", "daemon", timeout=30)
    assert done.returncode == 1 and "may be changed by other users" in done.stderr, done
    assert not (shared / "run").exists()


def test_control_socket_is_the_daemons_users_alone(public_run_dir):
    run_dir = public_run_dir
    asyncio.run(client.ensure_daemon(run_dir))
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    sock_path = run_dir / control.SOCKET
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
    # Open the socket's mode on purpose: the peer-credential check alone
    # must turn another uid away.
    os.chmod(run_dir, 0o711)
    os.chmod(sock_path, 0o666)
    probe = ("import socket, os, sys; os.setgid(65534); os.setuid(65534); "
             "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print(s.recv(4096).decode())")
    done = subprocess.run([sys.executable, "-c", probe, str(sock_path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["ok"] is False and "uid 65534 may not use this daemon" in answer["error"], done
    # Its own user is served; malformed requests get an error, not a hangup.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(b'{"id":7,"op":"banana","args":{}}\n{"id":8,"op":"status","args":{"x":1}}\n')
        replies = b""
        while replies.count(b"\n") < 2:
            replies += s.recv(4096)
    first, second = (json.loads(line) for line in replies.splitlines())
    assert (first["id"], first["ok"]) == (7, False) and "no such request" in first["error"]
    assert (second["id"], second["ok"]) == (8, False) and "bad arguments" in second["error"]
    # Arguments of the wrong kind are refused before anything acts on them:
    # a number where a path belongs (it would be taken for an fd), a
    # relative path, an exec: migration URI, an op that is not a string.
    bad = [{"op": "migrate", "args": {"src": "a", "dst": "b", "uri": "unix:/x", "trace": 7}},
           {"op": "attach", "args": {"name": "a", "qmp": "q.sock", "ram": "/r", "devices": ["/d"]}},
           {"op": "migrate", "args": {"src": "a", "dst": "b", "uri": "exec:touch /tmp/owned"}},
           {"op": "migrate", "args": {"src": "a", "dst": "b", "uri": "unix:/x", "options": {"timeout": "1"}}},
           {"op": ["status"], "args": {}}]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        for n, request in enumerate(bad):
            s.sendall(json.dumps({"id": 100 + n, **request}).encode() + b"\n")
        replies = b""
        while replies.count(b"\n") < len(bad):
            replies += s.recv(4096)
    answers = [json.loads(line) for line in replies.splitlines()]
    assert [a["id"] for a in answers] == [100 + n for n in range(len(bad))]
    assert all(not a["ok"] for a in answers), answers
    assert qmpmig(run_dir, "status").returncode == 0


@pytest.mark.qemu
def test_migration_asked_of_the_daemon_outlives_the_command(run_dir, tmp_path, guest_image):
    """The command exits; the daemon keeps the destination's device with
    its migrated state and its DMA going, and has released the source's."""
    src = Vm("src", "source", workdir=tmp_path).start()
    dst = Vm("dst", "destination", workdir=tmp_path).start()
    devs = [DeviceProcess(tmp_path / f"{side}.sock", "--state-size", "16M", "--dma-rate", "1000").start()
            for side in ("s", "d")]
    try:
        src.wait_heartbeat(1, 60)
        ring = f"{DMA_WINDOW[0]:#x}:{DMA_WINDOW[1]:#x}"
        for name, vm, dev, extra in (("src", src, devs[0], ["--start-ring", ring]), ("dst", dst, devs[1], [])):
            done = qmpmig(run_dir, "attach", name, "--qmp", str(vm.qmp_path), "--ram", str(vm.ram_path),
                          "--device", str(dev.socket), *extra)
            assert done.returncode == 0, done.stderr
        done = qmpmig(run_dir, "migrate", "--src", "src", "--dst", "dst", "--uri", f"unix:{tmp_path / 'mig.sock'}",
                      "--trace", str(tmp_path / "trace.jsonl"), "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        result = json.loads(done.stdout)
        assert result["ok"] and result["trace_violations"] == []
        assert result["devices"]["dev0"]["src_hash"] == result["devices"]["dev0"]["dst_hash"]

        def dst_device() -> dict:
            status = json.loads(qmpmig(run_dir, "status", "--json").stdout)
            assert [vm["name"] for vm in status["vms"]] == ["dst"], status
            return status["vms"][0]["devices"][0]

        first = dst_device()
        assert first["state"] == "RUNNING" and first["dma_seq"] > 0 and first["client_losses"] == 0
        time.sleep(2)
        later = dst_device()
        assert later["dma_seq"] > first["dma_seq"], "the destination device stopped its DMA"
        assert later["client_losses"] == 0, "the destination device lost its client"
        assert later["dma_faults"] == 0, "a DMA of the destination device failed"
        dst.wait_heartbeat(src.last_heartbeat(), 30)
        errors = records.verify(dst.ram_path.read_bytes()[DMA_WINDOW[0]:sum(DMA_WINDOW)], 1, later["dma_seq"])
        assert errors == []
        # The source's device was let go once the destination ran: a new
        # client finds it fresh.
        assert asyncio.run(fresh_registers(devs[0].socket)) == (0, 1)
    finally:
        for proc in devs:
            proc.close()
        src.close()
        dst.close()


async def fresh_registers(path) -> tuple[int, int]:
    """(dma_seq, client_losses) of a device, as a new client finds it."""
    dev = await asyncio.wait_for(RemoteDevice.open(str(path)), 10)
    try:
        return await read_register(dev.client, "dma_seq"), await read_register(dev.client, "client_losses")
    finally:
        await dev.close()


@pytest.mark.qemu
def test_a_silent_device_fails_its_attach_by_name_within_the_bound(run_dir, tmp_path, guest_image):
    """A device that is alive but answers nothing (SIGSTOP) fails the attach
    within the bound, naming it; the daemon goes on serving."""
    vm = Vm("quiet", "destination", workdir=tmp_path).start()
    dev = DeviceProcess(tmp_path / "quiet.sock").start()
    try:
        os.kill(dev.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        done = qmpmig(run_dir, "attach", "quiet", "--qmp", str(vm.qmp_path), "--ram", str(vm.ram_path),
                      "--device", str(dev.socket))
        assert done.returncode == 1 and "dev0" in done.stderr and "no answer within" in done.stderr, done.stderr
        assert time.monotonic() - t0 < 30
        assert vms_of(run_dir) == []
    finally:
        os.kill(dev.pid, signal.SIGCONT)
        dev.close()
        vm.close()


def vms_of(run_dir: Path) -> list:
    done = qmpmig(run_dir, "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["vms"]


#: Migrations of the soak in the tests (a hundred by hand: docs/reliability.md).
SOAK_MIGRATIONS = 10


def test_short_soak_the_daemon_does_not_grow(tmp_path, guest_image):
    """scripts/soak-daemon.py, ten migrations in a row through one daemon,
    two devices doing DMA: each passes its checks (clean trace, state
    hashes, heartbeat, the destination devices' DMA going on without a
    client loss), and the daemon's descriptors and threads stay as they
    were after the first, its memory within 8 MiB of what the first three
    reached."""
    spec = importlib.util.spec_from_file_location("soak", Path(__file__).parent.parent / "scripts" / "soak-daemon.py")
    soak = sys.modules["soak"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    rows = soak.soak(SOAK_MIGRATIONS, tmp_path, memory=128, devices=2)
    for figure in ("daemon_fds", "daemon_threads"):
        assert [row[figure] for row in rows] == [rows[0][figure]] * SOAK_MIGRATIONS, rows
    # Memory after the first migrations' warm-up (buffers of two devices'
    # streams): the last must not have grown past it.
    (warm,) = (max(rss) for rss in zip(*(row["daemon_rss_kib"] for row in rows[:3])))
    assert rows[-1]["daemon_rss_kib"][0] - warm < 8 << 10, rows


@pytest.mark.qemu
def test_a_migration_the_daemon_does_not_drive_is_cancelled_before_its_switchover(run_dir, tmp_path, guest_image):
    """Another manager migrates an attached VM over its own QMP monitor (the
    rig's observer plays it): the devices' state would stay behind, so the
    daemon cancels it before its switchover; the guest runs on with its
    device RUNNING and never reset, and a trace of its own records the
    violation, which the trace checker reports under ``managed``."""
    from qmpmig.qemu.qmp import Qemu

    src = Vm("src", "source", workdir=tmp_path).start()
    dst = Vm("dst", "destination", workdir=tmp_path).start()
    dev = DeviceProcess(tmp_path / "s.sock", "--state-size", "1M").start()
    try:
        src.wait_heartbeat(1, 60)
        done = qmpmig(run_dir, "attach", "src", "--qmp", str(src.qmp_path), "--ram", str(src.ram_path),
                      "--device", str(dev.socket))
        assert done.returncode == 0, done.stderr

        async def other_manager() -> None:
            uri = f"unix:{tmp_path / 'other.sock'}"
            for vm, command in ((dst, "migrate-incoming"), (src, "migrate")):
                qemu = Qemu(f"other-{vm.name}")
                await qemu.connect(str(vm.observer_qmp_path))
                await qemu.execute(command, {"uri": uri})
                await qemu.disconnect()
        asyncio.run(other_manager())
        deadline = time.monotonic() + 30
        while not (status := json.loads(qmpmig(run_dir, "status", "--json").stdout))["unmanaged"]:
            assert time.monotonic() < deadline, "the daemon did not stop the migration"
            time.sleep(0.2)
        (stopped,) = status["unmanaged"]
        assert stopped["stopped"] and "cancelled before its switchover" in stopped["message"], stopped
        check = subprocess.run([sys.executable, "-m", "qmpmig", "trace", "check", stopped["trace"]],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode != 0 and "managed" in check.stdout + check.stderr
        beat = src.last_heartbeat()
        src.wait_heartbeat(beat, 30)
        (vm,) = json.loads(qmpmig(run_dir, "status", "--json").stdout)["vms"]
        assert vm["runstate"] == "running" and vm["status"] == "cancelled", vm
        assert [(d["state"], d["client_losses"]) for d in vm["devices"]] == [("RUNNING", 0)]
    finally:
        for proc in (dev, src, dst):
            proc.close()


def test_the_daemon_fixes_glibcs_mmap_threshold():
    """mallopt(M_MMAP_THRESHOLD) takes on this glibc: the soak across hosts
    levels only with it (owner.DAEMON_MMAP_THRESHOLD)."""
    from qmpmig.daemon.owner import steady_malloc
    assert steady_malloc()
