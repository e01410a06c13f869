"""Who may reach a device and a guest's memory (issue 14, "Security"): the
device's socket is its owner's alone whatever the umask, a client of
another uid is hung up on, a DMA_MAP cannot point the device past the end
of its file nor a shrink afterwards kill it, and the rig's guest RAM files
are 0600.  Real device processes; the other uid is ``nobody``, by setpriv."""

import asyncio
import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qmpmig.device.bar0 import CTRL_DMA_ENABLE
from qmpmig.device.service import MIGRATION_REGION
from qmpmig.rig.processes import listening, stop_process
from qmpmig.rig.vm import Vm
from qmpmig.vfio_user.client import Client

from devtools import guest_memory, reg_read, reg_write, start_dma, until

MiB = 1 << 20
NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="another uid needs root (setpriv)")


def start_device(path: Path, *options: str, umask: int = 0o022) -> subprocess.Popen:
    """The reference device under ``umask``, once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "qmpmig.device.cli", "--socket", str(path), *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.umask(umask))
    deadline = time.monotonic() + 20
    while not listening(path):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_the_device_socket_is_0600_in_a_0700_directory_whatever_the_umask(tmp_path, umask):
    path = tmp_path / "made-by-the-device" / "dev.sock"
    proc = start_device(path, "--state-size", "1M", umask=umask)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    finally:
        stop_process(proc)


#: A client of the vfio-user protocol's first message, for another uid:
#: plain Python, nothing of qmpmig's (nobody cannot read /root).
VERSION_PROBE = r"""
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
body = struct.pack("<HH", 0, 2) + b"{}\x00"
s.settimeout(10)
try:
    s.sendall(struct.pack("<HHIII", 1, 1, 16 + len(body), 0, 0) + body)
    print("reply" if s.recv(16) else "hung up")
except (BrokenPipeError, ConnectionResetError):
    print("hung up")
"""


def open_socket_dir() -> Path:
    """A directory another uid can pass through (pytest's tmp_path is 0700)."""
    top = Path(tempfile.mkdtemp(prefix="qmpmig-sec-", dir="/tmp"))
    os.chmod(top, 0o711)
    return top


def as_nobody(path: Path) -> str:
    """The version probe, as nobody, at a socket an administrator left open
    to all (0666): ``reply`` or ``hung up``."""
    os.chmod(path, 0o666)
    probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            "/usr/bin/python3", "-c", VERSION_PROBE, str(path)],
                           capture_output=True, text=True, timeout=30)
    assert probe.stdout.strip() in ("reply", "hung up"), probe.stdout + probe.stderr
    return probe.stdout.strip()


@root_only
def test_a_client_of_another_uid_is_hung_up_on_before_a_byte_is_read():
    """Even where an administrator left the socket open to all (0666 in a
    0711 directory), a client whose uid is not the device's, root's or an
    --allow-uid gets no answer, and the device serves its own client on."""
    top = open_socket_dir()
    path = top / "dev.sock"
    proc = start_device(path, "--state-size", "1M", "--log-level", "INFO")
    try:
        assert as_nobody(path) == "hung up"

        async def own_client() -> int:
            client = await Client.connect(str(path))
            try:
                return (await client.device_info()).num_regions
            finally:
                await client.close()
        assert asyncio.run(own_client()) == 9
    finally:
        stop_process(proc)
        log = proc.stderr.read()
        shutil.rmtree(top, ignore_errors=True)
    assert f"refused a client of uid {NOBODY}" in log


@root_only
def test_an_allowed_uid_is_served():
    top = open_socket_dir()
    path = top / "dev.sock"
    proc = start_device(path, "--state-size", "1M", "--allow-uid", str(NOBODY))
    try:
        assert as_nobody(path) == "reply"
    finally:
        stop_process(proc)
        shutil.rmtree(top, ignore_errors=True)


async def test_a_dma_map_past_the_end_of_its_file_is_refused(spawn_device):
    """A mapping longer than the memory behind it would have the device's
    next DMA there killed by SIGBUS: refused with EINVAL, and the device
    goes on serving."""
    dev = spawn_device("--state-size", "1M")
    client = await Client.connect(str(dev.socket))
    try:
        mem = guest_memory(MiB)
        for size, offset in ((2 * MiB, 0), (MiB, 4096)):
            with pytest.raises(OSError) as err:
                await client.dma_map(0, size, os.dup(mem), offset=offset)
            assert err.value.errno == errno.EINVAL
        await client.dma_map(0, MiB, os.dup(mem))
        assert (await client.device_info()).num_regions == 9
        os.close(mem)
    finally:
        await client.close()


def shm_memory(size: int) -> int:
    """A file in /dev/shm standing in for guest RAM, as QEMU's
    memory-backend-file has it (no seals possible), already unlinked."""
    path = Path(tempfile.mktemp(prefix="qmpmig-sec-", suffix=".ram", dir="/dev/shm"))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    path.unlink()
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize("memory", [guest_memory, shm_memory], ids=["memfd", "shm-file"])
async def test_a_client_that_shrinks_its_file_under_a_dma_map_faults_the_dma_not_the_device(spawn_device, memory):
    """The client truncates the file behind its mapping while the device
    writes into it: each DMA there was a SIGBUS that killed the device.
    Now the device counts a DMA fault, stops its engine and answers on;
    the client that gives the memory back and restarts the engine gets
    DMA again (issue 14, seed 003)."""
    dev = spawn_device("--state-size", "1M", "--dma-rate", "2000")
    client = await Client.connect(str(dev.socket))
    mem = memory(2 * MiB)
    try:
        await start_dma(client, mem, 2 * MiB, ring_size=MiB)
        await until(lambda: reg_above(client, "dma_seq", 100), "DMA")
        os.ftruncate(mem, 0)
        await until(lambda: reg_above(client, "dma_faults", 0), "DMA fault reported")
        assert dev.proc.poll() is None
        assert not await reg_read(client, "ctrl") & CTRL_DMA_ENABLE
        stopped = await reg_read(client, "dma_seq")
        assert (await client.device_info()).num_regions == 9
        assert await client.state_hash()
        os.ftruncate(mem, 2 * MiB)
        await reg_write(client, "ctrl", CTRL_DMA_ENABLE)
        await until(lambda: reg_above(client, "dma_seq", stopped + 100), "DMA after the memory came back")
        assert await reg_read(client, "dma_faults") == 1
    finally:
        await client.close()
        os.close(mem)


async def reg_above(client, name: str, value: int) -> bool:
    return await reg_read(client, name) > value


async def test_the_v1_region_window_is_sealed_at_its_size(spawn_device):
    """The v1 migration region's fd goes to the client; the device maps
    its window itself, so the client may not shrink it (F_SEAL_SHRINK)."""
    dev = spawn_device("--state-size", "1M", "--migration", "v1")
    client = await Client.connect(str(dev.socket))
    try:
        region, fd = await client.region_info(MIGRATION_REGION)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        os.close(fd)
        assert len(await client.region_read(MIGRATION_REGION, region.size - 8, 8)) == 8
    finally:
        await client.close()


@pytest.mark.qemu
def test_the_rigs_guest_ram_file_is_0600(tmp_path):
    vm = Vm("sec", "destination", workdir=tmp_path).start()
    try:
        deadline = time.monotonic() + 10        # QEMU sizes it after its QMP sockets exist
        while vm.ram_path.stat().st_size < 256 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stat.S_IMODE(vm.ram_path.stat().st_mode) == 0o600
        assert vm.ram_path.stat().st_size >= 256 * MiB
    finally:
        vm.close()
