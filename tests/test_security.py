"""Who may reach a device and a guest's memory (issue 14, "Security"): the
device's socket is its owner's alone whatever the umask, a client of
another uid is hung up on, a DMA_MAP cannot point the device past the end
of its file nor a shrink afterwards kill it, and the rig's guest RAM files
are 0600.  Real device processes; the other uid is ``nobody``, by setpriv."""

import array
import asyncio
import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qmpmig.daemon import control
from qmpmig.device import records, savestream
from qmpmig.device.migration import Loader
from qmpmig.device.model import DeviceConfig
from qmpmig.device.state import InternalState
from qmpmig.errors import StreamError
from qmpmig.device.bar0 import CTRL_DMA_ENABLE, REGISTERS
from qmpmig.device.dma import MAX_DMA_MAPS
from qmpmig.device.service import MIGRATION_REGION
from qmpmig.migration.states import MigState
from qmpmig.rig.processes import listening, stop_process
from qmpmig.rig.vm import Vm
from qmpmig.vfio_user import codec
from qmpmig.vfio_user.client import Client
from qmpmig.vfio_user.codec import Command as C
from qmpmig.vfio_user.uapi import Feature, FeatureFlags as FF, IrqSetFlags, PciIrq, PciRegion

from devtools import RING_IOVA, guest_memory, reg_read, reg_write, start_dma, until

MiB = 1 << 20
NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="another uid needs root (setpriv)")


def start_device(path: Path, *options: str, umask: int = 0o022, stderr=subprocess.PIPE) -> subprocess.Popen:
    """The reference device under ``umask``, once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "qmpmig.device.cli", "--socket", str(path), *options],
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True,
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


# -- what a hostile client sends (issue 14: no allocation sized by an
#    unchecked field; seed 003: it spoils its own migration at most) -----------

class RawClient:
    """A synchronous vfio-user client that frames payloads as they are,
    unchecked: it sends what qmpmig's own client refuses to."""

    def __init__(self, path: Path | str, version: bool = True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(20)
        self.conn = codec.Connection(codec.Party.CLIENT, codec.QMPMIG_MAX_DATA_XFER, max_msg_fds=8)
        self._id = 0
        if version:
            assert self.version() == 0

    def version(self, **capabilities) -> int | None:
        capabilities = {"max_data_xfer_size": codec.QMPMIG_MAX_DATA_XFER, **capabilities}
        return self.errno(C.VERSION, codec.Version(0, 1, capabilities))

    def close(self) -> None:
        self.sock.close()

    def send(self, cmd: int, payload, fds: tuple[int, ...] = (), msg_size: int | None = None):
        """The reply (a Message), or None once the device hung up."""
        body = payload if isinstance(payload, bytes) else b"".join(map(bytes, payload._pieces()))
        self._id = (self._id + 1) & 0xFFFF
        data = codec.HEADER.pack(self._id, cmd, msg_size or codec.HEADER.size + len(body), 0, 0) + body
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            sent = self.sock.sendmsg([data], ancillary)
            self.sock.sendall(data[sent:])
        except (BrokenPipeError, ConnectionResetError):
            return None
        return self.reply()

    def reply(self):
        while (event := self.conn.next_event()) is codec.NEED_DATA:
            try:
                data = self.sock.recv(self.conn.max_message_size)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.conn.receive_data(data)
        return event

    def errno(self, cmd: int, payload, fds: tuple[int, ...] = ()) -> int | None:
        """0 for a reply, the errno of an error reply, None if hung up on."""
        reply = self.send(cmd, payload, fds)
        return None if reply is None else reply.error_no

    def feature(self, feature: int, flags: int, data: bytes = b"", room: int = 0):
        return self.send(C.DEVICE_FEATURE, codec.DeviceFeature(8 + len(data) + room, flags | feature, data))

    def set_state(self, state: MigState) -> int:
        return self.feature(Feature.MIG_DEVICE_STATE, FF.SET, codec.MigDeviceStateData(state).pack()).error_no

    def reg(self, name: str) -> int:
        field = REGISTERS[name]
        return field.unpack(self.send(C.REGION_READ, codec.RegionAccess(field.offset, PciRegion.BAR0, field.size))
                            .payload.data)

    def set_reg(self, name: str, value: int) -> None:
        field = REGISTERS[name]
        assert self.errno(C.REGION_WRITE, codec.RegionAccess(field.offset, PciRegion.BAR0, field.size,
                                                             field.pack(value))) == 0


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (VmRSS), or its peak (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


def oversized_fields(raw: RawClient, mem: int) -> dict[str, int | None]:
    """Every length, count and size of the wire a client chooses, at or
    past its bound: the errno each gets (None: hung up on)."""
    E, xfer, big_ranges = raw.errno, codec.QMPMIG_MAX_DATA_XFER, ((0, 4096),) * ((4 << 20) // 16 - 8)
    logging = {"START with LOG_MAX_RANGES + 1 ranges": ((0, 4096),) * (codec.LOG_MAX_RANGES + 1),
               "START with 4 MiB of ranges": big_ranges}
    out = {"DMA_MAP of the memory": E(C.DMA_MAP, codec.DmaMap(3, 0, 0, MiB), (os.dup(mem),)),
           "DMA_MAP of 2^64 - 1 bytes": E(C.DMA_MAP, codec.DmaMap(3, 0, 1 << 40, (1 << 64) - 1)),
           "REGION_READ of max_data_xfer_size + 1": E(C.REGION_READ, codec.RegionAccess(0, PciRegion.BAR0, xfer + 1)),
           "REGION_READ of max_data_xfer_size": E(C.REGION_READ, codec.RegionAccess(0, PciRegion.BAR0, xfer)),
           "MIG_DATA_READ of 2^32 - 1": E(C.MIG_DATA_READ, codec.MigDataRead(8, (1 << 32) - 1)),
           "SET_IRQS of 2^32 - 1 IRQs": E(C.DEVICE_SET_IRQS, codec.SetIrqs(
               20, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, PciIrq.INTX, 0, (1 << 32) - 1)),
           "REGION_WRITE_MULTI of MULTI_MAX + 1": E(C.REGION_WRITE_MULTI, codec.RegionWriteMulti(
               (codec.RegionAccess(0x30, PciRegion.BAR0, 8, bytes(8)),) * (codec.MULTI_MAX + 1)))}
    for name, ranges in logging.items():
        out[name] = raw.feature(Feature.DMA_LOGGING_START, FF.SET, codec.DmaLoggingControl(4096, ranges)._encode()).error_no
    out["START of the memory"] = raw.feature(Feature.DMA_LOGGING_START, FF.SET,
                                             codec.DmaLoggingControl(4096, ((0, MiB),)).pack()).error_no
    for length in (1 << 44, (1 << 64) - 4096):
        report = codec.DmaLoggingReport(0, length, 4096)._encode()
        out[f"REPORT of 2^{length.bit_length()} bytes"] = raw.feature(Feature.DMA_LOGGING_REPORT, FF.GET, report).error_no
    for i in range(MAX_DMA_MAPS):
        if (err := E(C.DMA_MAP, codec.DmaMap(3, 0, (1 << 32) + i * 4096, 4096))) != 0:
            out["DMA_MAP past max_dma_maps"] = err
            break
    out["msg_size 2^32 - 1"] = raw.send(C.DEVICE_GET_INFO, codec.DeviceInfo(16, 0, 0, 0), msg_size=(1 << 32) - 1) \
        .error_no
    out["then"] = None if raw.reply() is None else "still connected"
    return out


#: What :func:`oversized_fields` must get.
OVERSIZED_ANSWERS = {
    "DMA_MAP of the memory": 0,
    "DMA_MAP of 2^64 - 1 bytes": errno.EINVAL,
    "REGION_READ of max_data_xfer_size + 1": errno.EINVAL,
    "REGION_READ of max_data_xfer_size": errno.EINVAL,
    "MIG_DATA_READ of 2^32 - 1": errno.EINVAL,
    "SET_IRQS of 2^32 - 1 IRQs": errno.EINVAL,
    "REGION_WRITE_MULTI of MULTI_MAX + 1": errno.EINVAL,
    "START with LOG_MAX_RANGES + 1 ranges": errno.E2BIG,
    "START with 4 MiB of ranges": errno.E2BIG,
    "START of the memory": 0,
    "REPORT of 2^45 bytes": errno.E2BIG,
    "REPORT of 2^64 bytes": errno.E2BIG,
    "DMA_MAP past max_dma_maps": errno.ENOSPC,
    "msg_size 2^32 - 1": errno.EINVAL,
    "then": None,
}


def test_every_size_a_client_chooses_is_bounded_before_anything_is_allocated(spawn_device):
    """Each length, count or size field of the client's at its bound or
    past it gets a clean error reply; a msg_size past the bound loses the
    framing and the device hangs up.  The device answers on, and its
    memory stays within a few messages of 4 MiB, at its peak too (a 2^44-byte
    DMA_LOGGING_REPORT took the device to 1 GiB, a 1 MiB VERSION some
    20 MiB more)."""
    dev = spawn_device("--state-size", "1M")
    before = rss_mib(dev.proc.pid)
    raw = RawClient(dev.socket, version=False)
    mem = guest_memory(MiB)
    try:
        assert raw.version(pad=[[]] * (1 << 18)) == errno.EINVAL
        assert raw.version() == 0
        answers = oversized_fields(raw, mem)
    finally:
        raw.close()
        os.close(mem)
    assert answers == OVERSIZED_ANSWERS
    raw = RawClient(dev.socket)
    try:
        assert raw.send(C.DEVICE_GET_INFO, codec.DeviceInfo(16, 0, 0, 0)).payload.num_regions == 9
    finally:
        raw.close()
    peak = rss_mib(dev.proc.pid, "VmHWM")
    assert peak - before < 32, f"RSS {before:.0f} MiB, then a peak of {peak:.0f} MiB"


def poll(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def hostile(path: str, other_socket: str, other_ram: str) -> dict:
    """What a hostile client does to its own device, and tries on another
    VM's: what it got each time (run as another uid by the test below)."""
    out = {}
    raw = RawClient(path, version=False)
    out["VERSION of 1 MiB of JSON"] = raw.version(pad=[[]] * (1 << 18))
    raw.version()
    mem = guest_memory(2 * MiB)
    raw.errno(C.DMA_MAP, codec.DmaMap(3, 0, RING_IOVA, 2 * MiB), (os.dup(mem),))
    for name, value in (("ring_iova", RING_IOVA), ("ring_size", MiB), ("ctrl", CTRL_DMA_ENABLE)):
        raw.set_reg(name, value)
    out["DMA before the shrink"] = poll(lambda: raw.reg("dma_seq") > 50)
    os.ftruncate(mem, 0)
    out["DMA fault reported"] = poll(lambda: raw.reg("dma_faults") > 0) and raw.reg("dma_faults")
    out["engine stopped"] = not raw.reg("ctrl") & CTRL_DMA_ENABLE
    os.ftruncate(mem, 2 * MiB)
    raw.set_reg("dma_rate", (1 << 32) - 1)
    raw.set_reg("ctrl", CTRL_DMA_ENABLE)
    start = time.monotonic()
    raw.send(C.DEVICE_GET_INFO, codec.DeviceInfo(16, 0, 0, 0))
    out["answers within 0.5 s at dma_rate 2^32 - 1"] = time.monotonic() - start < 0.5
    out["state 99"] = raw.feature(Feature.MIG_DEVICE_STATE, FF.SET, bytes(8)[:4] + (99).to_bytes(4, "little")).error_no
    out["RESUMING"] = raw.set_state(MigState.RESUMING)
    out["a stream of garbage refused"] = raw.errno(C.MIG_DATA_WRITE, codec.MigDataWrite(8 + 4096, 4096, os.urandom(4096))) != 0
    out["leaving RESUMING refused"] = raw.set_state(MigState.RUNNING) != 0

    def state() -> str:
        reply = raw.feature(Feature.MIG_DEVICE_STATE, FF.GET, room=8)
        return MigState(codec.MigDeviceStateData.unpack(reply.payload.data).device_state).name
    out["then"] = state()
    out["DEVICE_RESET"] = raw.errno(C.DEVICE_RESET, codec.Empty())
    out["after the reset"] = state()
    out["oversized fields"] = oversized_fields(raw, mem)
    raw.close()
    for what, reach in (("other VM's RAM", lambda: open(other_ram, "rb")),
                        ("other VM's socket", lambda: RawClient(other_socket))):
        try:
            reach()
            out[what] = "reached"
        except OSError as err:
            out[what] = type(err).__name__
    raw = RawClient(path)
    out["served again"] = raw.send(C.DEVICE_GET_INFO, codec.DeviceInfo(16, 0, 0, 0)).payload.num_regions
    raw.close()
    return out


HOSTILE_GETS = {
    "VERSION of 1 MiB of JSON": errno.EINVAL,
    "DMA before the shrink": True,
    "DMA fault reported": 1,
    "engine stopped": True,
    "answers within 0.5 s at dma_rate 2^32 - 1": True,
    "state 99": errno.EINVAL,
    "RESUMING": 0,
    "a stream of garbage refused": True,
    "leaving RESUMING refused": True,
    "then": "ERROR",
    "DEVICE_RESET": 0,
    "after the reset": "RUNNING",
    "oversized fields": OVERSIZED_ANSWERS,
    "other VM's RAM": "PermissionError",
    "other VM's socket": "PermissionError",
    "served again": 9,
}


def run_hostile(path: Path, other_socket: Path, other_ram: Path) -> dict:
    """:func:`hostile` as nobody."""
    done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           sys.executable, __file__, str(path), str(other_socket), str(other_ram)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@root_only
async def test_a_hostile_client_spoils_its_own_device_at_most(spawn_device):
    """Seed 003: "the kernel must protect itself from hostile userspace";
    a buggy or hostile user may corrupt its own migration.  A client of
    another uid (nobody, allowed to its own device and handed its socket)
    shrinks its memory under the DMA, programs the fastest DMA, walks into
    ERROR by a stream of garbage, sends every size past its bound and
    breaks the framing; it cannot open another VM's guest RAM (0600, as
    the rig's) or its device's socket (0600 in a 0700 directory).  Its own
    device serves it again afterwards; the other VM's device, next to it,
    keeps its state (hash unchanged while stopped), does DMA all along
    (every record in place, no fault) and never loses its client."""
    top = open_socket_dir()
    path = top / "hostile.sock"
    with open(top / "hostile.log", "w") as log:
        proc = start_device(path, "--state-size", "1M", "--allow-uid", str(NOBODY), stderr=log)
    os.chown(path, NOBODY, -1)
    other = spawn_device("--state-size", "1M", "--dma-rate", "1000")
    ram = Path(tempfile.mktemp(prefix="qmpmig-sec-", suffix=".ram", dir="/dev/shm"))
    fd = os.open(ram, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.ftruncate(fd, 2 * MiB)
    client = await Client.connect(str(other.socket))
    try:
        await start_dma(client, fd, 2 * MiB, ring_size=MiB)
        await until(lambda: reg_above(client, "dma_seq", 50), "the other VM's DMA")
        await client.set_device_state(MigState.STOP)
        digest = await client.state_hash()
        assert await asyncio.to_thread(run_hostile, path, other.socket, ram) == HOSTILE_GETS
        assert await client.state_hash() == digest
        await client.set_device_state(MigState.RUNNING)
        before = await reg_read(client, "dma_seq")
        assert await asyncio.to_thread(run_hostile, path, other.socket, ram) == HOSTILE_GETS
        await reg_write(client, "ctrl", 0)         # the engine stops; MMIO goes on (it does not in STOP)
        written = await reg_read(client, "dma_seq")
        assert written > before + 500
        assert records.verify(os.pread(fd, MiB, 0), 1, written) == []
        assert [await reg_read(client, name) for name in ("dma_faults", "client_losses")] == [0, 0]
        assert proc.poll() is None and other.proc.poll() is None
    finally:
        await client.close()
        os.close(fd)
        ram.unlink()
        stop_process(proc)
        shutil.rmtree(top, ignore_errors=True)



@pytest.mark.parametrize("line", [b"[" * 100_000 + b"]" * 100_000, b"1" * 5000, b"\xff", b"[]"],
                         ids=["deep", "long int", "not UTF-8", "not an object"])
def test_a_control_line_that_is_no_request_is_a_control_error(line):
    """The daemon's control and peer protocol: whatever JSON a line holds
    (nesting past the recursion limit, an int past 4300 digits), the
    connection gets a ControlError, which the daemon answers and closes
    on, never another exception."""
    with pytest.raises(control.ControlError):
        control.LineReader().feed(line + b"\n")


@pytest.mark.parametrize("tag, payload", [(b"REGS", b"[1]"), (b"REGS", b"[" * 5000 + b"]" * 5000),
                                          (b"REGS", b" " * (savestream.MAX_JSON + 1))],
                         ids=["a list", "deep", "past MAX_JSON"])
def test_a_stream_json_chunk_must_be_a_small_object(tag, payload):
    """A resume stream is the client's to write, CRCs and all: its JSON
    chunks are refused (StreamError: the device goes to ERROR) unless they
    are objects of at most MAX_JSON bytes."""
    config = DeviceConfig(state_size=1 << 20).stream_config()
    loader = Loader(InternalState(1 << 20), config)
    with pytest.raises(StreamError):
        loader.write(savestream.header(config) + savestream.encode(tag, 0, payload))

if __name__ == "__main__":
    print(json.dumps(hostile(*sys.argv[1:4])))
