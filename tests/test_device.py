"""The reference device, a real ``qmpmig-device`` process, over real UNIX
sockets: every message type, malformed input, device-to-device migration
v1 and v2, the DMA dirty log, IO page requests, and bad resume streams."""

import asyncio
import errno
import mmap
import os
import re
import socket
import struct
import time

import pytest

from qmpmig.device import records
from qmpmig.controller.devices import RemoteDevice, drain
from qmpmig.migration.states import V1, MigState as S
from qmpmig.vfio_user import codec, uapi
from qmpmig.vfio_user.client import Client

from devtools import RING_IOVA, guest_memory, reg_read, reg_write, start_dma, until

MiB = 1 << 20


async def test_every_message_type_v2(spawn_device):
    dev = spawn_device("--state-size", "1M")
    c = await Client.connect(str(dev.socket))
    try:
        assert c.capabilities["max_data_xfer_size"] == codec.QMPMIG_MAX_DATA_XFER
        info = await c.device_info()
        assert (info.flags, info.num_regions, info.num_irqs) == (3, 9, 5)
        bar0, fd = await c.region_info(0)
        assert (bar0.size, bar0.flags, fd) == (4096, 3, None)
        assert (await c.region_info(7))[0].size == 256
        assert (await c.region_info(8))[0].size == 0
        with pytest.raises(OSError) as err:
            await c.region_info(9)
        assert err.value.errno == errno.EINVAL
        assert [(await c.irq_info(i)).count for i in range(5)] == [1, 1, 0, 1, 1]
        with pytest.raises(OSError):
            await c.irq_info(5)
        efd = os.eventfd(0)
        await c.set_irqs(1, uapi.IrqSetFlags.DATA_EVENTFD | uapi.IrqSetFlags.ACTION_TRIGGER, 0, 1, fds=(efd,))
        await c.set_irqs(1, uapi.IrqSetFlags.DATA_NONE | uapi.IrqSetFlags.ACTION_TRIGGER, 0, 0)
        os.close(efd)
        assert struct.unpack("<HH", await c.region_read(7, 0, 4)) == (0x1B36, 0x7F01)
        assert await reg_read(c, "magic") == 0x47504D51
        await reg_write(c, "scratch", 0xDEADBEEF)
        assert await reg_read(c, "scratch") == 0xDEADBEEF
        mem = guest_memory(MiB)
        await c.dma_map(RING_IOVA, MiB, os.dup(mem))
        with pytest.raises(OSError) as err:
            await c.dma_map(RING_IOVA + 4096, 4096, os.dup(mem))
        assert err.value.errno == errno.EEXIST
        with pytest.raises(OSError):
            await c.dma_unmap(RING_IOVA, 4096)
        await c.dma_unmap(RING_IOVA, MiB)
        assert await c.probe(uapi.Feature.MIGRATION)
        assert not await c.probe(uapi.Feature.MIGRATION, uapi.FeatureFlags.SET)
        assert await c.migration_flags() == 7
        assert await c.device_state() == S.RUNNING
        # A GET that carries its 8-byte buffer (zeros: state 0 would be
        # ERROR as a SET) is a GET all the same.
        buffer = codec.MigDeviceStateData(0).pack()
        got = await c.feature(uapi.Feature.MIG_DEVICE_STATE, uapi.FeatureFlags.GET, buffer)
        assert codec.MigDeviceStateData.unpack(got).device_state == S.RUNNING == await c.device_state()
        assert await c.mig_data_size() > MiB
        with pytest.raises(OSError):
            await c.precopy_info()
        await c.set_device_state(S.PRE_COPY)
        info = await c.precopy_info()
        assert info.initial_bytes > MiB and info.dirty_bytes == 0
        data = await c.mig_data_read(4096)
        assert len(data) == 4096
        digest = await c.state_hash()
        assert len(digest) == 32
        await c.reset()
        assert await c.device_state() == S.RUNNING
        with pytest.raises(OSError):
            await c.mig_data_read(4096)
        await c.dma_map(RING_IOVA, MiB, os.dup(mem))
        assert await c.dma_logging_start(4096, [(RING_IOVA, MiB)]) == 4096
        assert await c.dma_logging_report(RING_IOVA, MiB) == bytes(32)
        await c.dma_logging_stop()
        with pytest.raises(OSError):
            await c.dma_logging_report(RING_IOVA, MiB)
        await c.set_device_state(S.RESUMING)
        with pytest.raises(OSError):
            await c.mig_data_write(b"not a stream, not at all")
        os.close(mem)
    finally:
        await c.close()
    assert dev.alive()


async def test_v1_device_offers_the_migration_region(spawn_device):
    dev = spawn_device("--state-size", "1M", "--migration", "v1")
    c = await Client.connect(str(dev.socket))
    try:
        assert (await c.device_info()).num_regions == 10
        region, fd = await c.region_info(9)
        caps = {type(cap): cap for cap in region.caps}
        assert (caps[codec.TypeCap].type, caps[codec.TypeCap].subtype) == (3, 1)
        assert caps[codec.SparseMmapCap].areas == ((4096, MiB),)
        assert region.flags & uapi.RegionInfoFlags.MMAP and fd is not None
        window = mmap.mmap(fd, MiB, offset=region.offset + 4096)
        os.close(fd)
        with pytest.raises(OSError) as err:
            await c.migration_flags()
        assert err.value.errno == errno.ENOTTY
        short, fd = await c.region_info(9, argsz=32)
        assert short.argsz > 32 and short.flags & uapi.RegionInfoFlags.CAPS and not short.caps and fd is None
        # device_state at offset 0, misaligned or wrong-width access refused.
        assert struct.unpack("<I", await c.region_read(9, 0, 4))[0] == V1.RUNNING
        with pytest.raises(OSError):
            await c.region_read(9, 2, 4)
        await c.region_write(9, 0, struct.pack("<I", V1.SAVING | V1.RUNNING))
        struct.unpack("<Q", await c.region_read(9, 8, 8))
        offset = struct.unpack("<Q", await c.region_read(9, 16, 8))[0]
        size = struct.unpack("<Q", await c.region_read(9, 24, 8))[0]
        assert offset == 4096 and size > 0
        # The same bytes through the trapped path and the mmap'd window.
        assert await c.region_read(9, offset, 64) == window[:64]
        window.close()
        for bad in (5, 6, 7, V1.RESUMING | V1.SAVING | V1.RUNNING, 0x10):
            with pytest.raises(OSError):
                await c.region_write(9, 0, struct.pack("<I", bad))
        assert struct.unpack("<I", await c.region_read(9, 0, 4))[0] == V1.SAVING | V1.RUNNING
    finally:
        await c.close()


# -- malformed input ------------------------------------------------------------


class Raw:
    """A hand-driven client socket, for bytes no client would send."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(path))
        self.conn = codec.Connection(codec.Party.CLIENT)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def version(self) -> None:
        self.send(self.conn.send(codec.Message(0, codec.Command.VERSION, codec.Version(0, 1, {"capabilities": {}}))))
        assert self.next().payload.major == 0

    def frame(self):
        """The next frame as raw header fields and payload; None at EOF."""
        data = b""
        while len(data) < 16 or len(data) < codec.HEADER.unpack_from(data)[2]:
            more = self.sock.recv(1 << 16)
            if not more:
                return None
            data += more
        msg_id, cmd, size, flags, error_no = codec.HEADER.unpack_from(data)
        return msg_id, cmd, flags, error_no, data[16:size]

    def next(self):
        while (event := self.conn.next_event()) is codec.NEED_DATA:
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            self.conn.receive_data(data)
        return event

    def close(self):
        self.sock.close()


def header(msg_id, cmd, size, flags=0):
    return codec.HEADER.pack(msg_id, cmd, size, flags, 0)


@pytest.mark.parametrize("frame,what", [
    (header(7, 99, 16), "unknown command"),
    (header(7, codec.Command.DMA_MAP, 24) + bytes(8), "truncated DMA_MAP"),
    (header(7, codec.Command.REGION_READ, 32) + struct.pack("<QII", 0, 0, 2 * MiB), "count beyond max"),
    (header(7, codec.Command.DEVICE_GET_INFO, 32) + struct.pack("<IIII", 16, 0xFF, 0, 0), "reserved bits"),
    (header(7, codec.Command.DEVICE_FEATURE, 32) + struct.pack("<IIQ", 16, 1 << 31, 0), "feature flags"),
    (header(7, codec.Command.VERSION, 20) + struct.pack("<HH", 0, 1), "second VERSION"),
])
def test_malformed_message_gets_an_error_reply(spawn_device, frame, what):
    dev = spawn_device("--state-size", "1M")
    raw = Raw(dev.socket)
    raw.version()
    raw.send(frame)
    msg_id, cmd, flags, error_no, payload = raw.frame()
    assert (msg_id, cmd) == (7, int.from_bytes(frame[2:4], "little")), what
    assert flags & codec.HeaderFlags.ERROR and flags & 0xF == 1 and error_no == errno.EINVAL, what
    assert payload == b"", what
    # The connection goes on.
    raw.send(raw.conn.send(codec.Message(8, codec.Command.DEVICE_GET_INFO, codec.DeviceInfo(16, 0, 0, 0))))
    event = raw.next()
    assert event.payload.num_regions == 9, event
    raw.close()
    assert dev.alive()


@pytest.mark.parametrize("frame,what", [
    (header(3, codec.Command.DEVICE_GET_INFO, 8), "msg_size below the header"),
    (header(3, codec.Command.MIG_DATA_WRITE, 64 * MiB), "msg_size beyond the maximum"),
])
def test_unframeable_message_closes_that_connection_only(spawn_device, frame, what):
    dev = spawn_device("--state-size", "1M")
    raw = Raw(dev.socket)
    raw.version()
    raw.send(frame)
    reply = raw.frame()
    if reply is not None:
        assert reply[0] == 3 and reply[2] & codec.HeaderFlags.ERROR
        assert raw.frame() is None, what
    raw.close()
    again = Raw(dev.socket)
    again.version()
    again.close()
    assert dev.alive()


def test_first_command_must_be_version(spawn_device):
    dev = spawn_device("--state-size", "1M")
    raw = Raw(dev.socket)
    raw.send(raw.conn.send(codec.Message(1, codec.Command.DEVICE_GET_INFO, codec.DeviceInfo(16, 0, 0, 0))))
    reply = raw.next()
    assert reply.payload is None and reply.error_no == errno.EINVAL
    assert raw.next() is None
    raw.close()
    assert dev.alive()


def test_client_vanishing_mid_message_does_not_hang_the_device(spawn_device):
    dev = spawn_device("--state-size", "1M")
    raw = Raw(dev.socket)
    raw.version()
    raw.send(header(4, codec.Command.MIG_DATA_WRITE, 16 + 8 + 4096)[:10])
    raw.close()
    again = Raw(dev.socket)
    again.version()
    again.close()


# -- migration ------------------------------------------------------------------


async def seq_above(client, n: int) -> bool:
    return await reg_read(client, "dma_seq") > n


async def migrate(src: RemoteDevice, dst: RemoteDevice, precopy: bool, src_client_mem=None) -> dict:
    """The reference save and resume flows of seed 000, through the client."""
    await dst.reset()
    await dst.set_state(S.STOP)
    await dst.set_state(S.RESUMING)
    moved = 0
    if precopy:
        await src.set_state(S.PRE_COPY)
        moved += await drain(src, dst)
        await until(lambda: src.pending(), "state dirtied after the first pass")
        moved += await drain(src, dst)
    grace = S.PRE_COPY_P2P if precopy else S.RUNNING_P2P
    await src.set_state(grace)
    seq = await reg_read(src.client, "dma_seq")
    await asyncio.sleep(0.1)
    assert await reg_read(src.client, "dma_seq") == seq, "DMA in the grace state"
    if precopy:
        moved += await drain(src, dst)
    await src.set_state(S.STOP_COPY)
    moved += await drain(src, dst)
    assert await src.read_data() == b""
    digest = await src.state_hash()
    await dst.set_state(S.STOP)
    return {"moved": moved, "seq": seq, "src_hash": digest, "dst_hash": await dst.state_hash(),
            "dst_state": await dst.state()}


@pytest.mark.parametrize("size", ["1M", "256M"])
@pytest.mark.parametrize("precopy", [True, False], ids=["precopy", "stopcopy"])
@pytest.mark.parametrize("protocol", ["v2", "v1"])
async def test_device_to_device_migration(spawn_device, protocol, precopy, size):
    flags = ("--mig-flags", "STOP_COPY,P2P,PRE_COPY" if precopy else "STOP_COPY,P2P")
    opts = ("--migration", protocol, "--state-size", size, "--dma-rate", "2000", *flags)
    a, b = spawn_device(*opts), spawn_device(*opts)
    src, dst = await RemoteDevice.open(str(a.socket)), await RemoteDevice.open(str(b.socket))
    mem = guest_memory(MiB)
    try:
        assert (src.protocol, dst.protocol) == (protocol, protocol)
        await start_dma(src.client, mem, MiB)
        await until(lambda: seq_above(src.client, 100), "100 DMA records")
        result = await migrate(src, dst, precopy)
        assert result["dst_state"] is S.STOP
        assert result["src_hash"] == result["dst_hash"]
        assert result["moved"] >= int(size[:-1]) * MiB
        assert result["seq"] > 100
        ring = mmap.mmap(mem, 64 << 10)
        assert records.verify(ring, 1, result["seq"]) == []
        # The destination loaded the DMA engine with the state: same seq.
        await dst.set_state(S.RUNNING)
        assert await reg_read(dst.client, "dma_seq") == result["seq"]
    finally:
        await src.close()
        await dst.close()
        os.close(mem)


async def test_one_gib_of_state_migrates(spawn_device):
    opts = ("--state-size", "1G", "--mutate-rate", "2000")
    a, b = spawn_device(*opts), spawn_device(*opts)
    src, dst = await RemoteDevice.open(str(a.socket)), await RemoteDevice.open(str(b.socket))
    try:
        t0 = time.monotonic()
        result = await migrate(src, dst, precopy=True)
        assert result["src_hash"] == result["dst_hash"] and result["moved"] >= 1 << 30
        print(f"1 GiB device state migrated in {time.monotonic() - t0:.1f} s")
    finally:
        await src.close()
        await dst.close()


# -- DMA dirty log, page requests, MMIO -------------------------------------------


async def test_dma_dirty_log_misses_no_page(spawn_device):
    dev = spawn_device("--state-size", "1M", "--dma-rate", "20000")
    c = await Client.connect(str(dev.socket))
    ring_size = 256 << 10
    mem = guest_memory(MiB)
    slots = ring_size // records.SIZE
    try:
        await c.dma_logging_start(4096, [(RING_IOVA, MiB)])
        await start_dma(c, mem, MiB, ring_size)
        done, rounds = 0, 0
        deadline = time.monotonic() + 30
        while rounds < 8:
            assert time.monotonic() < deadline, f"the DMA engine stalled at record {done}"
            await asyncio.sleep(0.05)
            await c.set_device_state(S.RUNNING_P2P)
            seq = await reg_read(c, "dma_seq")
            bitmap = await c.dma_logging_report(RING_IOVA, MiB)
            await c.set_device_state(S.RUNNING)
            reported = set(uapi.bitmap_pages(bitmap))
            written = {((s % slots) * records.SIZE) // 4096 for s in range(done, seq)}
            assert written <= reported, f"pages written but not reported: {sorted(written - reported)}"
            assert reported <= written, f"pages reported but not written: {sorted(reported - written)}"
            done, rounds = seq, rounds + 1 if seq > done else rounds
        assert done > slots, "the ring never wrapped"
    finally:
        await c.close()
        os.close(mem)


async def test_page_requests_hold_stop_until_completed(spawn_device):
    dev = spawn_device("--state-size", "1M", "--dma-rate", "5000", "--fault-stride", "2")
    c = await Client.connect(str(dev.socket))
    mem = guest_memory(MiB)
    arrived, release, seen = asyncio.Event(), asyncio.Event(), []

    async def on_page_request(request):
        seen.append(request.iova)
        arrived.set()
        await release.wait()

    c.on_page_request = on_page_request
    try:
        await start_dma(c, mem, MiB)
        await asyncio.wait_for(arrived.wait(), 5)
        assert (seen[0] // 4096) % 2 == 1 and await reg_read(c, "page_requests") == 1
        for target in (S.STOP, S.STOP_COPY, S.RESUMING):
            with pytest.raises(OSError) as err:
                await c.set_device_state(target)
            assert err.value.errno == errno.EBUSY
            assert await c.device_state() == S.RUNNING
        # NDMA (RUNNING_P2P) is entered while requests are outstanding:
        # that is where seed 000 completes them.
        await c.set_device_state(S.RUNNING_P2P)
        with pytest.raises(OSError):
            await c.set_device_state(S.STOP)
        seq = await reg_read(c, "dma_seq")
        release.set()
        await asyncio.sleep(0.1)
        assert await reg_read(c, "dma_seq") == seq, "a completed request let DMA through in NDMA"
        await c.set_device_state(S.STOP)
        await c.set_device_state(S.RUNNING)
        async def dma_and_another_request():
            return len(seen) > 1 and await seq_above(c, seq)
        await until(dma_and_another_request, "DMA and a second page request after the first completed")
        await c.set_device_state(S.RUNNING_P2P)
        written = await reg_read(c, "dma_seq")
        assert written > seq and len(seen) > 1
        assert records.verify(mmap.mmap(mem, 64 << 10), 1, written) == []
    finally:
        await c.close()
        os.close(mem)


async def test_mmio_while_stopped_is_harmless(spawn_device):
    dev = spawn_device("--state-size", "1M")
    c = await Client.connect(str(dev.socket))
    try:
        await reg_write(c, "scratch", 42)
        await c.set_device_state(S.STOP)
        before = await c.state_hash()
        assert await reg_read(c, "magic") == 0xFFFFFFFF
        assert await reg_read(c, "scratch") == (1 << 64) - 1
        await reg_write(c, "scratch", 7)
        await reg_write(c, "ctrl", 1)
        await c.region_write(0, 0x100, b"\x01" * 8)
        assert await c.state_hash() == before
        assert struct.unpack("<H", await c.region_read(7, 0, 2))[0] == 0x1B36
        await c.set_device_state(S.RUNNING)
        assert (await reg_read(c, "scratch"), await reg_read(c, "ctrl")) == (42, 0)
    finally:
        await c.close()


async def test_disconnect_leaves_a_fresh_device(spawn_device):
    dev = spawn_device("--state-size", "1M")
    c = await Client.connect(str(dev.socket))
    mem = guest_memory(MiB)
    await start_dma(c, mem, MiB)
    await reg_write(c, "scratch", 99)
    await asyncio.sleep(0.1)
    await c.set_device_state(S.PRE_COPY)
    await c.close()
    c = await Client.connect(str(dev.socket))
    try:
        assert await c.device_state() == S.RUNNING
        assert (await reg_read(c, "scratch"), await reg_read(c, "ctrl"), await reg_read(c, "dma_seq")) == (0, 0, 0)
        assert await reg_read(c, "client_losses") == 1
        await c.dma_map(RING_IOVA, MiB, os.dup(mem))  # the old mapping is gone
    finally:
        await c.close()
        os.close(mem)


# -- bad streams ----------------------------------------------------------------


async def saved_stream(src: RemoteDevice) -> bytes:
    await src.set_state(S.STOP_COPY)
    data = bytearray()
    while piece := await src.read_data():
        data += piece
    return bytes(data)


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "wrong-config", "garbage"])
@pytest.mark.parametrize("protocol", ["v2", "v1"])
async def test_bad_stream_puts_destination_in_error_and_spares_the_source(spawn_device, damage, protocol):
    a = spawn_device("--migration", protocol, "--state-size", "1M")
    b = spawn_device("--migration", protocol, "--state-size", "2M" if damage == "wrong-config" else "1M")
    src, dst = await RemoteDevice.open(str(a.socket)), await RemoteDevice.open(str(b.socket))
    try:
        stream = await saved_stream(src)
        src_hash = await src.state_hash()
        if damage == "corrupt":
            mid = len(stream) // 2
            stream = stream[:mid] + bytes([stream[mid] ^ 0x40]) + stream[mid + 1:]
        elif damage == "truncated":
            stream = stream[:-100]
        elif damage == "garbage":
            stream = os.urandom(len(stream))
        await dst.reset()
        await dst.set_state(S.RESUMING)
        try:
            await dst.write_data(stream)
        except OSError as err:
            assert err.errno == errno.EINVAL
        with pytest.raises(OSError):
            await dst.set_state(S.STOP)
        assert await dst.state() is S.ERROR
        with pytest.raises(OSError):
            await dst.set_state(S.RUNNING)
        await dst.reset()
        assert await dst.state() is S.RUNNING
        reason = {"corrupt": "checksum", "truncated": "truncated", "wrong-config": "configuration",
                  "garbage": "header|tag"}[damage]
        assert re.search(reason, b.log_tail(20)), b.log_tail(20)
        # The source never noticed: same state, and it runs on.
        assert await src.state_hash() == src_hash
        await src.set_state(S.RUNNING)
        assert await src.state() is S.RUNNING
    finally:
        await src.close()
        await dst.close()
