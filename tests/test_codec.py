"""qmpmig.vfio_user.codec: every message both ways, golden bytes worked out
by hand from the spec's tables, streams cut anywhere, fds on the right
message, each malformed case, and what send() refuses."""

import errno
import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from qmpmig.errors import LocalProtocolError, RemoteProtocolError
from qmpmig.vfio_user.codec import (
    CARRIES_DATA, NEED_DATA, PAYLOADS, BadMessage, Command, Connection, DeviceFeature,
    DeviceInfo, DmaAccess, DmaLoggingControl, DmaLoggingReport, DmaMap, DmaUnmap,
    Empty, IoFdEntry, IrqInfo, MigDataRead, MigDataSizeData, MigDataWrite, MigDeviceStateData,
    MigrationData, Message, PageRequest, Party, PrecopyInfoData, RegionAccess, RegionInfo,
    RegionIoFds, RegionWriteMulti, RegionWriteMultiReply, SetIrqs, SparseMmapCap,
    StateHashData, TypeCap, Version, error_reply, reply_to)
from qmpmig.vfio_user.uapi import (
    DmaFlags, Feature, FeatureFlags, IrqSetFlags, RegionInfoFlags, bitmap_pages, bitmap_set,
    dirty_bitmap_size)

C = Command
CLIENT, SERVER = Party.CLIENT, Party.SERVER
F = FeatureFlags
I = IrqSetFlags
R = RegionInfoFlags


def frame(cmd, payload=b"", msg_id=9, flags=0, error_no=0, size=None):
    """A frame built by hand: ``<HHIII`` then the payload."""
    size = 16 + len(payload) if size is None else size
    return struct.pack("<HHIII", msg_id, cmd, size, flags, error_no) + payload


def decode(receiver, data, fds=(), **limits):
    conn = Connection(receiver, **limits)
    conn.receive_data(data, fds)
    event = conn.next_event()
    assert conn.next_event() is NEED_DATA
    return event


def cmd(msg_id, command, payload, **kw):
    return Message(msg_id, command, payload, **kw)


def rep(msg_id, command, payload, **kw):
    return Message(msg_id, command, payload, reply=True, **kw)


# A sparse-mmap region with a TYPE capability: 32-byte struct, SPARSE_MMAP
# at 32 (8 header + 8 + 2 * 16 = 48 bytes), TYPE at 80 (16 bytes): argsz 96.
CAPS = (SparseMmapCap(((0, 0x1000), (0x3000, 0x1000))), TypeCap(3, 1))
REGION_WITH_CAPS = RegionInfo(96, R.READ | R.WRITE | R.MMAP | R.CAPS, 9, 32, 0x4000, 0, CAPS)

# (sender, message): every (cmd, reply) of PAYLOADS at least once.
SAMPLES = [
    (CLIENT, cmd(1, C.VERSION, Version(0, 1, {"max_msg_fds": 8, "twin_socket": {"supported": True}}))),
    (SERVER, rep(1, C.VERSION, Version(0, 1, {"max_msg_fds": 1, "max_data_xfer_size": 1 << 20,
                                              "twin_socket": {"supported": True, "fd_index": 0}}),
                 fds=(30,))),
    (CLIENT, cmd(2, C.DMA_MAP, DmaMap(DmaFlags.READ | DmaFlags.WRITE, 0, 0x100000, 0x200000), fds=(31,))),
    (SERVER, rep(2, C.DMA_MAP, Empty())),
    (CLIENT, cmd(3, C.DMA_UNMAP, DmaUnmap(24, 0, 0x100000, 0x200000))),
    (SERVER, rep(3, C.DMA_UNMAP, DmaUnmap(24, 0, 0x100000, 0x200000))),
    (CLIENT, cmd(4, C.DEVICE_GET_INFO, DeviceInfo(16, 0, 0, 0))),
    (SERVER, rep(4, C.DEVICE_GET_INFO, DeviceInfo(16, 3, 10, 5))),
    (CLIENT, cmd(5, C.DEVICE_GET_REGION_INFO, RegionInfo(32, 0, 9, 0, 0, 0))),
    (SERVER, rep(5, C.DEVICE_GET_REGION_INFO, REGION_WITH_CAPS, fds=(32,))),
    (SERVER, rep(5, C.DEVICE_GET_REGION_INFO, RegionInfo(96, R.READ | R.CAPS, 9, 0, 0x4000, 0))),
    (CLIENT, cmd(6, C.DEVICE_GET_REGION_IO_FDS, RegionIoFds(96, 0, 2, 0))),
    (SERVER, rep(6, C.DEVICE_GET_REGION_IO_FDS,
                 RegionIoFds(96, 0, 2, 2, (IoFdEntry(0x100, 4, 0, 0, 0, 0), IoFdEntry(0x200, 4, 1, 0, 2, 7))),
                 fds=(33, 34))),
    (CLIENT, cmd(7, C.DEVICE_GET_IRQ_INFO, IrqInfo(16, 0, 2, 0))),
    (SERVER, rep(7, C.DEVICE_GET_IRQ_INFO, IrqInfo(16, 3, 2, 32))),
    (CLIENT, cmd(8, C.DEVICE_SET_IRQS, SetIrqs(20, I.DATA_EVENTFD | I.ACTION_TRIGGER, 2, 0, 2), fds=(35, 36))),
    (CLIENT, cmd(8, C.DEVICE_SET_IRQS, SetIrqs(23, I.DATA_BOOL | I.ACTION_TRIGGER, 0, 0, 3, b"\1\0\1"))),
    (SERVER, rep(8, C.DEVICE_SET_IRQS, Empty())),
    (CLIENT, cmd(9, C.REGION_READ, RegionAccess(0x10, 0, 4))),
    (SERVER, rep(9, C.REGION_READ, RegionAccess(0x10, 0, 4, b"\1\2\3\4"))),
    (CLIENT, cmd(10, C.REGION_WRITE, RegionAccess(0x20, 1, 2, b"\xab\xcd"), no_reply=True)),
    (SERVER, rep(10, C.REGION_WRITE, RegionAccess(0x20, 1, 2))),
    (SERVER, cmd(11, C.DMA_READ, DmaAccess(0x100000, 8))),
    (CLIENT, rep(11, C.DMA_READ, DmaAccess(0x100000, 8, bytes(range(8))))),
    (SERVER, cmd(12, C.DMA_WRITE, DmaAccess(0x100008, 3, b"abc"))),
    (CLIENT, rep(12, C.DMA_WRITE, DmaAccess(0x100008, 3))),
    (CLIENT, cmd(13, C.DEVICE_RESET, Empty())),
    (SERVER, rep(13, C.DEVICE_RESET, Empty())),
    (CLIENT, cmd(15, C.REGION_WRITE_MULTI,
                 RegionWriteMulti((RegionAccess(0, 0, 4, b"abcd"), RegionAccess(8, 2, 8, b"12345678"))))),
    (SERVER, rep(15, C.REGION_WRITE_MULTI, RegionWriteMultiReply(2))),
    (CLIENT, cmd(16, C.DEVICE_FEATURE, DeviceFeature(16, F.GET | Feature.MIGRATION))),
    (SERVER, rep(16, C.DEVICE_FEATURE, DeviceFeature(16, F.GET | Feature.MIGRATION, b"\5" + bytes(7)))),
    (CLIENT, cmd(17, C.MIG_DATA_READ, MigDataRead(8 + 4096, 4096))),
    (SERVER, rep(17, C.MIG_DATA_READ, MigDataRead(8 + 3, 3, b"xyz"))),
    (CLIENT, cmd(18, C.MIG_DATA_WRITE, MigDataWrite(8 + 5, 5, b"hello"))),
    (SERVER, rep(18, C.MIG_DATA_WRITE, Empty())),
    (SERVER, cmd(19, C.QMPMIG_PAGE_REQUEST, PageRequest(1, 0x100000, 1))),
    (CLIENT, rep(19, C.QMPMIG_PAGE_REQUEST, PageRequest(1, 0x100000, 1))),
    (SERVER, rep(20, C.REGION_READ, None, error_no=errno.EIO)),
    (SERVER, rep(21, C.DEVICE_RESET, None)),
    (CLIENT, rep(22, C.DMA_READ, None, error_no=errno.EFAULT)),
]
LIMITS = {"max_msg_fds": 8}


def test_samples_cover_every_message():
    covered = {(m.cmd, m.reply) for _, m in SAMPLES if m.payload is not None}
    assert covered == {(c, r) for c in PAYLOADS for r in (False, True)}
    assert len(covered) == 36
    assert {c for c, _ in CARRIES_DATA} == {C.REGION_READ, C.REGION_WRITE, C.DMA_READ, C.DMA_WRITE,
                                            C.MIG_DATA_READ, C.MIG_DATA_WRITE}


def sample_id(case):
    sender, msg = case
    return f"{sender.name}-{getattr(msg.cmd, 'name', msg.cmd)}-{'reply' if msg.reply else 'command'}"


@pytest.mark.parametrize("sender,msg", SAMPLES, ids=[sample_id(c) for c in SAMPLES])
def test_round_trip(sender, msg):
    data = Connection(sender, **LIMITS).send(msg)
    assert decode(sender.peer, data, msg.fds, **LIMITS) == msg


# -- Golden bytes -------------------------------------------------------------

def test_golden_dma_map_request():
    data = Connection(CLIENT).send(cmd(7, C.DMA_MAP, DmaMap(3, 0x1000, 0x10000, 0x2000)))
    assert len(data) == 48
    assert data == bytes.fromhex(
        "0700" "0200" "30000000" "00000000" "00000000"        # header: id 7, cmd 2, size 48
        "20000000" "03000000"                                 # argsz 32, flags READ|WRITE
        "0010000000000000" "0000010000000000" "0020000000000000")  # offset, address, size


def test_golden_version_with_empty_capabilities():
    data = Connection(CLIENT).send(cmd(1, C.VERSION, Version(0, 1, {})))
    assert data == bytes.fromhex("0100" "0100" "28000000" "00000000" "00000000" "0000" "0100") \
        + b'{"capabilities":{}}\0'
    assert len(data) == 40


def test_golden_version_without_json():
    assert decode(SERVER, bytes.fromhex("0100 0100 14000000 00000000 00000000 0000 0100")) == \
        cmd(1, C.VERSION, Version(0, 1, {}))


def test_golden_error_reply():
    request = cmd(5, C.REGION_READ, RegionAccess(0, 0, 4))
    data = Connection(SERVER).send(error_reply(request, errno.EINVAL))
    assert data == bytes.fromhex("0500" "0900" "10000000" "21000000" "16000000")


def test_golden_region_read_reply():
    data = Connection(SERVER).send(rep(3, C.REGION_READ, RegionAccess(0x10, 7, 4, b"\xaa\xbb\xcc\xdd")))
    assert data == bytes.fromhex("0300" "0900" "24000000" "01000000" "00000000"
                                 "1000000000000000" "07000000" "04000000" "aabbccdd")


def test_golden_region_info_with_type_cap():
    info = RegionInfo(0, R.READ | R.WRITE, 9, 0, 0x1000, 0, (TypeCap(3, 1),))
    data = Connection(SERVER).send(rep(4, C.DEVICE_GET_REGION_INFO, info))
    assert data == bytes.fromhex(
        "0400" "0500" "40000000" "01000000" "00000000"        # size 64 = 16 + 32 + 16
        "30000000" "0b000000" "09000000" "20000000"           # argsz 48, flags |CAPS, index, cap_offset 32
        "0010000000000000" "0000000000000000"                 # size, offset
        "0200" "0100" "00000000" "03000000" "01000000")       # TYPE v1, next 0, type 3, subtype 1


def test_golden_page_request():
    data = Connection(SERVER).send(cmd(2, C.QMPMIG_PAGE_REQUEST, PageRequest(5, 0x7000, 1)))
    assert data == bytes.fromhex("0200" "017f" "28000000" "00000000" "00000000"
                                 "0500000000000000" "0070000000000000" "0100000000000000")


@pytest.mark.parametrize("payload", [
    struct.pack("<QI", 0x5000, 8),          # spec table: count u32
    struct.pack("<QQ", 0x5000, 8),          # libvfio-user: count u64
])
def test_dma_write_reply_of_12_or_16_bytes(payload):
    assert decode(SERVER, frame(C.DMA_WRITE, payload, flags=1)) == rep(9, C.DMA_WRITE, DmaAccess(0x5000, 8))


def test_encoder_lays_out_the_capability_chain():
    info = RegionInfo(0, R.READ | R.WRITE | R.MMAP, 9, 0, 0x4000, 0, CAPS)
    data = Connection(SERVER).send(rep(5, C.DEVICE_GET_REGION_INFO, info, fds=(3,)))
    payload = data[16:]
    assert len(payload) == 96
    assert struct.unpack_from("<IIII", payload) == (96, 0xF, 9, 32)
    assert struct.unpack_from("<HHIII", payload, 32) == (1, 1, 80, 2, 0)   # SPARSE_MMAP, next 80
    assert struct.unpack_from("<HHIII", payload, 80) == (2, 1, 0, 3, 1)    # TYPE, last
    assert decode(CLIENT, data, (3,)).payload == REGION_WITH_CAPS


def test_decoder_follows_a_chain_with_a_gap():
    payload = struct.pack("<IIIIQQ", 56, R.CAPS, 9, 40, 0, 0) + bytes(8) + struct.pack("<HHIII", 2, 1, 0, 3, 1)
    assert decode(CLIENT, frame(C.DEVICE_GET_REGION_INFO, payload, flags=1)).payload == \
        RegionInfo(56, R.CAPS, 9, 40, 0, 0, (TypeCap(3, 1),))


# -- Streams and fds -----------------------------------------------------------

def stream(sender):
    return [m for s, m in SAMPLES if s is sender]


def receive_all(conn, chunks):
    events = []
    for data, fds in chunks:
        conn.receive_data(data, fds)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    return events


@settings(max_examples=200, deadline=None)
@given(data=st.data(), sender=st.sampled_from(Party))
def test_stream_cut_anywhere_decodes_the_same(data, sender):
    msgs = data.draw(st.lists(st.sampled_from(stream(sender)), min_size=1, max_size=8))
    tx = Connection(sender, **LIMITS)
    frames = [tx.send(m) for m in msgs]
    blob = b"".join(frames)
    starts = [sum(map(len, frames[:i])) for i in range(len(frames))]
    # fds travel with the chunk where their message begins, as a sendmsg
    # per message makes SCM_RIGHTS do: cut there.
    fd_starts = {start: m.fds for start, m in zip(starts, msgs) if m.fds}
    cuts = data.draw(st.sets(st.integers(1, len(blob) - 1), max_size=20)) if len(blob) > 1 else set()
    edges = sorted(cuts | set(fd_starts) | {0, len(blob)})
    chunks = [(blob[a:b], fd_starts.get(a, ())) for a, b in zip(edges, edges[1:])]
    assert receive_all(Connection(sender.peer, **LIMITS), chunks) == msgs


def test_stream_byte_by_byte():
    msgs = [replace(m, fds=()) for m in stream(CLIENT)]
    blob = b"".join(Connection(CLIENT, **LIMITS).send(m) for m in msgs)
    chunks = [(blob[i:i + 1], ()) for i in range(len(blob))]
    assert receive_all(Connection(SERVER, **LIMITS), chunks) == msgs


MAP = cmd(1, C.DMA_MAP, DmaMap(1, 0, 0x1000, 0x1000))
READ = cmd(2, C.REGION_READ, RegionAccess(0, 0, 4))


def test_fds_go_to_the_message_whose_header_starts_in_the_chunk():
    tx = Connection(CLIENT)
    read, dma_map = tx.send(READ), tx.send(MAP)
    conn = Connection(SERVER)
    # The tail of READ and all of DMA_MAP arrive together with one fd.
    events = receive_all(conn, [(read[:20], ()), (read[20:] + dma_map, (7,))])
    assert [e.fds for e in events] == [(), (7,)]


def test_fds_in_the_middle_of_a_message_belong_to_it():
    tx = Connection(CLIENT)
    dma_map, read = tx.send(MAP), tx.send(READ)
    events = receive_all(Connection(SERVER), [(dma_map[:10], ()), (dma_map[10:30], (7,)),
                                               (dma_map[30:] + read, ())])
    assert [e.fds for e in events] == [(7,), ()]


def test_fds_of_a_chunk_with_two_headers_go_to_the_first():
    tx = Connection(CLIENT)
    events = receive_all(Connection(SERVER), [(tx.send(MAP) + tx.send(READ), (7,))])
    assert [e.fds for e in events] == [(7,), ()]


def test_pending_fds_are_those_not_yet_handed_out():
    conn = Connection(SERVER)
    conn.receive_data(Connection(CLIENT).send(MAP)[:20], (7,))
    assert conn.next_event() is NEED_DATA
    assert conn.pending_fds == (7,)


# -- Malformed input -----------------------------------------------------------

def caps_reply(tail, cap_offset=32, flags=R.CAPS):
    """A REGION_INFO reply payload with ``tail`` after the struct."""
    return struct.pack("<IIIIQQ", 32 + len(tail), flags, 9, cap_offset, 0, 0) + tail


TYPE_CAP = struct.pack("<HHIII", 2, 1, 0, 3, 1)
MIGRATION_GET = F.GET | Feature.MIGRATION

# (id, receiver, frame, fds, the reason's key words)
MALFORMED = [
    ("unknown cmd", SERVER, frame(99), (), "unknown command"),
    ("DIRTY_PAGES", SERVER, frame(14, bytes(16)), (), "unknown command"),
    ("server gets DMA_READ", SERVER, frame(C.DMA_READ, bytes(16)), (), "not a command a client sends"),
    ("client gets REGION_READ", CLIENT, frame(C.REGION_READ, bytes(16)), (), "not a command a server sends"),
    ("server gets a reply to its non-command", SERVER, frame(C.DEVICE_GET_INFO, bytes(16), flags=1), (),
     "not a command a server sends"),
    ("client gets an error reply to DMA_READ", CLIENT, frame(C.DMA_READ, flags=0x21), (),
     "not a command a client sends"),
    ("short DMA_MAP", SERVER, frame(C.DMA_MAP, struct.pack("<IIQQQ", 32, 1, 0, 0, 0)[:31]), (), "shorter"),
    ("long GET_INFO", SERVER, frame(C.DEVICE_GET_INFO, bytes(20)), (), "4 bytes too many"),
    ("DMA_MAP argsz", SERVER, frame(C.DMA_MAP, struct.pack("<IIQQQ", 40, 1, 0, 0, 0)), (), "argsz 40"),
    ("VERSION no NUL", SERVER, frame(C.VERSION, b"\0\0\1\0{}"), (), "NUL"),
    ("VERSION not UTF-8", SERVER, frame(C.VERSION, b"\0\0\1\0\xff\xfe\0"), (), "UTF-8"),
    ("VERSION bad JSON", SERVER, frame(C.VERSION, b"\0\0\1\0{\0"), (), "bad JSON"),
    ("VERSION JSON array", SERVER, frame(C.VERSION, b"\0\0\1\0[]\0"), (), "not an object"),
    ("VERSION capabilities array", SERVER, frame(C.VERSION, b'\0\0\1\0{"capabilities":[]}\0'), (),
     "capabilities is not an object"),
    *[(f"VERSION {key}={value}", CLIENT,
       frame(C.VERSION, b"\0\0\1\0" + b'{"capabilities":{"%s":%s}}\0' % (key.encode(), value.encode()),
             flags=1), (), key)
      for key in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes")
      for value in ("-1", "1.5", '"8"', "true", "null")],
    ("VERSION twin_socket", CLIENT,
     frame(C.VERSION, b'\0\0\1\0{"capabilities":{"twin_socket":{"supported":1}}}\0', flags=1), (),
     "twin_socket"),
    ("REGION_WRITE short data", SERVER, frame(C.REGION_WRITE, struct.pack("<QII", 0, 0, 4) + b"abc"), (),
     "3 bytes of data for count 4"),
    ("REGION_READ request with data", SERVER, frame(C.REGION_READ, struct.pack("<QII", 0, 0, 1) + b"a"), (),
     "where none belongs"),
    ("REGION_READ reply long data", CLIENT,
     frame(C.REGION_READ, struct.pack("<QII", 0, 0, 1) + b"ab", flags=1), (), "2 bytes of data for count 1"),
    ("REGION_WRITE reply with data", CLIENT,
     frame(C.REGION_WRITE, struct.pack("<QII", 0, 0, 1) + b"a", flags=1), (), "where none belongs"),
    ("REGION_READ count over the limit", SERVER, frame(C.REGION_READ, struct.pack("<QII", 0, 0, 65)), (),
     "max_data_xfer_size"),
    ("DMA_WRITE short data", CLIENT, frame(C.DMA_WRITE, struct.pack("<QQ", 0, 2) + b"a"), (),
     "1 bytes of data for count 2"),
    ("DMA_READ reply short data", SERVER, frame(C.DMA_READ, struct.pack("<QQ", 0, 2) + b"a", flags=1), (),
     "count 2"),
    ("DMA_WRITE reply of 13 bytes", SERVER, frame(C.DMA_WRITE, bytes(13), flags=1), (), "shorter"),
    ("MIG_DATA_READ reply size", CLIENT, frame(C.MIG_DATA_READ, struct.pack("<II", 12, 4) + b"abc", flags=1),
     (), "for size 4"),
    ("MIG_DATA_READ size over the limit", SERVER, frame(C.MIG_DATA_READ, struct.pack("<II", 8, 65)), (),
     "size 65 exceeds"),
    ("MIG_DATA_WRITE size", SERVER, frame(C.MIG_DATA_WRITE, struct.pack("<II", 12, 4) + b"abcde"), (),
     "for size 4"),
    ("header flag bit 6", SERVER, frame(C.DEVICE_RESET, flags=0x40), (), "reserved header flags"),
    ("Type 2", SERVER, frame(C.DEVICE_RESET, flags=2), (), "Type"),
    ("command with Error", SERVER, frame(C.DEVICE_RESET, flags=0x20), (), "Error flag"),
    ("command with error_no", SERVER, frame(C.DEVICE_RESET, error_no=5), (), "error_no"),
    ("reply with No_reply", CLIENT, frame(C.DEVICE_RESET, flags=0x11), (), "No_reply"),
    ("error reply with fds", CLIENT, frame(C.DEVICE_RESET, flags=0x21, error_no=5), (4,), "carries no fds"),
    ("error_no without Error", CLIENT, frame(C.DEVICE_RESET, flags=1, error_no=5), (), "without the Error"),
    ("DMA_MAP flags", SERVER, frame(C.DMA_MAP, struct.pack("<IIQQQ", 32, 4, 0, 0, 0)), (), "reserved flag bits 0x4"),
    ("DMA_UNMAP flags", SERVER, frame(C.DMA_UNMAP, struct.pack("<IIQQ", 24, 1, 0, 0)), (), "reserved flag bits 0x1"),
    ("GET_INFO reply flags", CLIENT, frame(C.DEVICE_GET_INFO, struct.pack("<IIII", 16, 4, 0, 0), flags=1), (),
     "reserved flag bits 0x4"),
    ("IRQ_INFO reply flags", CLIENT, frame(C.DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 16, 16, 0, 0), flags=1), (),
     "reserved flag bits 0x10"),
    ("FEATURE flags", SERVER, frame(C.DEVICE_FEATURE, struct.pack("<II", 8, 1 << 19 | MIGRATION_GET)), (),
     "reserved flag bits 0x80000"),
    ("FEATURE GET|SET", SERVER, frame(C.DEVICE_FEATURE, struct.pack("<II", 8, F.GET | F.SET | 1)), (),
     "GET and SET"),
    ("PAGE_REQUEST flags", CLIENT, frame(C.QMPMIG_PAGE_REQUEST, struct.pack("<QQQ", 1, 0, 2)), (),
     "reserved flag bits 0x2"),
    ("SET_IRQS two DATA bits", SERVER,
     frame(C.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, I.DATA_NONE | I.DATA_BOOL | I.ACTION_MASK, 0, 0, 0)), (),
     "one DATA_"),
    ("SET_IRQS no ACTION", SERVER, frame(C.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, I.DATA_NONE, 0, 0, 0)), (),
     "one ACTION_"),
    ("SET_IRQS flags", SERVER, frame(C.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x41, 0, 0, 0)), (),
     "reserved flag bits 0x40"),
    ("SET_IRQS argsz", SERVER,
     frame(C.DEVICE_SET_IRQS, struct.pack("<IIIII", 24, I.DATA_NONE | I.ACTION_TRIGGER, 0, 0, 0)), (), "argsz 24"),
    ("SET_IRQS bool count", SERVER,
     frame(C.DEVICE_SET_IRQS, struct.pack("<IIIII", 22, I.DATA_BOOL | I.ACTION_TRIGGER, 0, 0, 3) + b"\1\1"), (),
     "3 expected"),
    ("SET_IRQS more eventfds than count", SERVER,
     frame(C.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, I.DATA_EVENTFD | I.ACTION_TRIGGER, 0, 0, 1)), (4, 5),
     "2 fds, at most 1"),
    ("fds on REGION_READ", SERVER, frame(C.REGION_READ, struct.pack("<QII", 0, 0, 4)), (4,), "1 fds, at most 0"),
    ("two fds on DMA_MAP", SERVER, frame(C.DMA_MAP, struct.pack("<IIQQQ", 32, 1, 0, 0, 0)), (4, 5),
     "2 fds, at most 1"),
    ("fd on a REGION_INFO without MMAP", CLIENT, frame(C.DEVICE_GET_REGION_INFO, caps_reply(b"", 0, 0), flags=1),
     (4,), "1 fds, at most 0"),
    ("cap chain loops", CLIENT, frame(C.DEVICE_GET_REGION_INFO, caps_reply(struct.pack("<HHIII", 2, 1, 32, 3, 1)),
                                      flags=1), (), "goes back to 32"),
    ("cap chain goes backwards", CLIENT,
     frame(C.DEVICE_GET_REGION_INFO, caps_reply(struct.pack("<HHIII", 2, 1, 48, 3, 1)
                                                + struct.pack("<HHIII", 2, 1, 40, 3, 1)), flags=1), (),
     "goes back to 40"),
    ("cap_offset into the struct", CLIENT, frame(C.DEVICE_GET_REGION_INFO, caps_reply(TYPE_CAP, 16), flags=1), (),
     "goes back to 16"),
    ("cap_offset out of bounds", CLIENT, frame(C.DEVICE_GET_REGION_INFO, caps_reply(TYPE_CAP, 200), flags=1), (),
     "outside the 48-byte payload"),
    ("next out of bounds", CLIENT,
     frame(C.DEVICE_GET_REGION_INFO, caps_reply(struct.pack("<HHIII", 2, 1, 4096, 3, 1)), flags=1), (),
     "capability at 4096 lies outside"),
    ("cap body cut short", CLIENT,
     frame(C.DEVICE_GET_REGION_INFO, caps_reply(struct.pack("<HHIII", 1, 1, 0, 2, 0) + bytes(16)), flags=1), (),
     "SPARSE_MMAP with 2 areas runs past"),
    ("sparse reserved", CLIENT,
     frame(C.DEVICE_GET_REGION_INFO, caps_reply(struct.pack("<HHIII", 1, 1, 0, 0, 1)), flags=1), (),
     "reserved field"),
    ("unknown cap", CLIENT,
     frame(C.DEVICE_GET_REGION_INFO, caps_reply(struct.pack("<HHIII", 3, 1, 0, 0, 0)), flags=1), (),
     "unknown capability id 3"),
    ("cap version 2", CLIENT,
     frame(C.DEVICE_GET_REGION_INFO, caps_reply(struct.pack("<HHIII", 2, 2, 0, 0, 0)), flags=1), (),
     "version 2"),
    ("cap_offset without CAPS", CLIENT, frame(C.DEVICE_GET_REGION_INFO, caps_reply(TYPE_CAP, flags=R.READ),
                                              flags=1), (), "without the CAPS flag"),
    ("bytes after the chain", CLIENT, frame(C.DEVICE_GET_REGION_INFO, caps_reply(TYPE_CAP + bytes(8)), flags=1),
     (), "8 bytes too many"),
    ("REGION_INFO bytes without caps", SERVER, frame(C.DEVICE_GET_REGION_INFO, caps_reply(bytes(8), 0, 0)), (),
     "8 bytes too many"),
    ("IO_FDS entries for count", CLIENT,
     frame(C.DEVICE_GET_REGION_IO_FDS, struct.pack("<IIII", 96, 0, 0, 2) + bytes(40), flags=1), (),
     "1 entries for count 2"),
    ("IO_FDS partial entry", CLIENT,
     frame(C.DEVICE_GET_REGION_IO_FDS, struct.pack("<IIII", 56, 0, 0, 1) + bytes(39), flags=1), (),
     "39 bytes are not a whole number of 40-byte"),
    ("WRITE_MULTI wr_cnt", SERVER, frame(C.REGION_WRITE_MULTI, struct.pack("<Q", 2) + bytes(24)), (),
     "wr_cnt 2 with 1 entries"),
    ("WRITE_MULTI count 9", SERVER,
     frame(C.REGION_WRITE_MULTI, struct.pack("<Q", 1) + struct.pack("<QII8s", 0, 0, 9, b"")), (),
     "at most 8 bytes"),
]


@pytest.mark.parametrize("receiver,bad,fds,reason", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_frame_gives_bad_message_and_the_next_one_decodes(receiver, bad, fds, reason):
    good_sender, good = next((s, m) for s, m in SAMPLES if s is receiver.peer and not m.fds)
    conn = Connection(receiver, max_data_xfer_size=64)
    conn.receive_data(bad + Connection(good_sender).send(good), fds)
    event = conn.next_event()
    msg_id, command, _, flags, _ = struct.unpack_from("<HHIII", bad)
    assert isinstance(event, BadMessage), event
    assert (event.msg_id, event.cmd, event.reply, event.errno, event.fds, event.fatal) == \
        (msg_id, command, flags & 0xF == 1, errno.EINVAL, fds, False)
    assert reason in event.reason
    assert conn.next_event() == good
    assert conn.next_event() is NEED_DATA


@settings(max_examples=500, deadline=None)
@given(receiver=st.sampled_from(Party), command=st.sampled_from([*Command, 0, 14, 99]),
       flags=st.sampled_from([0, 1, 0x10, 0x21, 0x40, 2]), payload=st.binary(max_size=96),
       fds=st.lists(st.integers(3, 99), max_size=2))
def test_arbitrary_frames_never_raise(receiver, command, flags, payload, fds):
    conn = Connection(receiver, max_data_xfer_size=64, max_msg_fds=2)
    conn.receive_data(frame(command, payload, flags=flags), fds)
    event = conn.next_event()
    assert isinstance(event, (Message, BadMessage)) and not getattr(event, "fatal", False)
    assert event.fds == tuple(fds)
    assert conn.next_event() is NEED_DATA


def test_bad_message_of_an_unknown_command_can_be_answered():
    server = Connection(SERVER)
    server.receive_data(frame(99, b"junk", msg_id=4, flags=0x10))
    bad = server.next_event()
    assert (bad.cmd, bad.no_reply) == (99, True)
    data = server.send(error_reply(bad, bad.errno))
    assert data == bytes.fromhex("0400" "6300" "10000000" "21000000" "16000000")


@pytest.mark.parametrize("size", [0, 15, 16 + 32 + 64 + 1, 0xFFFFFFFF])
def test_msg_size_out_of_range_is_fatal(size):
    conn = Connection(SERVER, max_data_xfer_size=64)
    assert conn.max_message_size == 16 + 32 + 64
    conn.receive_data(frame(C.REGION_WRITE, size=size, msg_id=3) + Connection(CLIENT).send(READ), (6,))
    bad = conn.next_event()
    assert (bad.msg_id, bad.cmd, bad.fatal, bad.errno, bad.fds) == (3, C.REGION_WRITE, True, errno.EINVAL, (6,))
    assert str(size) in bad.reason
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"more")


def test_largest_message_fits():
    data = Connection(CLIENT, max_data_xfer_size=64).send(cmd(1, C.REGION_WRITE, RegionAccess(0, 0, 64, bytes(64))))
    assert decode(SERVER, data, max_data_xfer_size=64).payload.count == 64


def test_error_reply_may_carry_errno_zero():
    assert decode(CLIENT, frame(C.DEVICE_RESET, flags=0x21)) == rep(9, C.DEVICE_RESET, None)


# -- What is tolerated from real implementations (PROTOCOL.md) -------------------

def test_tolerated_an_error_reply_with_a_payload_is_an_error_reply():
    # libvfio-user answers a failed REGION_READ with the request's payload.
    got = decode(CLIENT, frame(C.REGION_READ, struct.pack("<QII", 0, 0, 4), flags=0x21, error_no=22))
    assert got == rep(9, C.REGION_READ, None, error_no=22)


def test_tolerated_a_mig_data_read_reply_longer_than_its_size_field():
    # libvfio-user sends the whole requested buffer with size = bytes valid.
    got = decode(CLIENT, frame(C.MIG_DATA_READ, struct.pack("<II", 16, 4) + b"abcdEXTRA", flags=1))
    assert got.payload == MigDataRead(16, 4, b"abcd")


def test_sent_messages_stay_strict():
    with pytest.raises(LocalProtocolError, match="for size 4"):
        Connection(SERVER).send(rep(1, C.MIG_DATA_READ, MigDataRead(16, 4, b"abcdEXTRA")))


# -- What send() refuses ------------------------------------------------------

REFUSED = [
    ("unknown cmd", CLIENT, cmd(1, 99, Empty()), "unknown command"),
    ("client sends DMA_READ", CLIENT, cmd(1, C.DMA_READ, DmaAccess(0, 1)), "not a command a client sends"),
    ("server sends REGION_READ", SERVER, cmd(1, C.REGION_READ, RegionAccess(0, 0, 1)),
     "not a command a server sends"),
    ("client replies to REGION_READ", CLIENT, rep(1, C.REGION_READ, RegionAccess(0, 0, 1, b"a")),
     "not a command a server sends"),
    ("wrong payload class", CLIENT, cmd(1, C.MIG_DATA_WRITE, MigDataRead(9, 1, b"a")), "must be MigDataWrite"),
    ("count mismatch", CLIENT, cmd(1, C.REGION_WRITE, RegionAccess(0, 0, 2, b"a")), "1 bytes of data for count 2"),
    ("data in a read", CLIENT, cmd(1, C.REGION_READ, RegionAccess(0, 0, 1, b"a")), "where none belongs"),
    ("count over the limit", CLIENT, cmd(1, C.REGION_READ, RegionAccess(0, 0, 65)), "max_data_xfer_size 64"),
    ("message over the limit", CLIENT, cmd(1, C.DEVICE_FEATURE, DeviceFeature(8, F.SET | 6, bytes(200))),
     "exceed max_message_size 112"),
    ("fds on a non-carrier", CLIENT, cmd(1, C.REGION_READ, RegionAccess(0, 0, 1), fds=(3,)), "at most 0"),
    ("too many fds", CLIENT, cmd(1, C.DEVICE_SET_IRQS, SetIrqs(20, I.DATA_EVENTFD | I.ACTION_TRIGGER, 0, 0, 4),
                                 fds=(3, 4)), "2 fds, at most 1"),
    ("No_reply on a reply", SERVER, rep(1, C.DEVICE_RESET, Empty(), no_reply=True), "No_reply"),
    ("error_no with a payload", SERVER, rep(1, C.DEVICE_RESET, Empty(), error_no=5), "error_no"),
    ("command without payload", CLIENT, cmd(1, C.DEVICE_RESET, None), "error reply"),
    ("error reply with fds", SERVER, rep(1, C.DEVICE_RESET, None, fds=(3,)), "error reply"),
    ("msg_id too big", CLIENT, cmd(70000, C.DEVICE_RESET, Empty()), "msg_id is not a u16"),
    ("field out of range", CLIENT, cmd(1, C.DMA_MAP, DmaMap(1, -1, 0, 0)), "does not fit its width"),
    ("bad capability", CLIENT, cmd(1, C.VERSION, Version(0, 1, {"max_msg_fds": -1})), "max_msg_fds"),
    ("capabilities not JSON", CLIENT, cmd(1, C.VERSION, Version(0, 1, {"x": object()})), "capabilities are not JSON"),
    ("reserved flag bits", CLIENT, cmd(1, C.DMA_MAP, DmaMap(8, 0, 0, 0)), "reserved flag bits 0x8"),
    ("SET_IRQS argsz", CLIENT, cmd(1, C.DEVICE_SET_IRQS, SetIrqs(20, I.DATA_BOOL | I.ACTION_MASK, 0, 0, 1, b"\1")),
     "argsz 20"),
    ("IO_FDS entries", SERVER,
     rep(1, C.DEVICE_GET_REGION_IO_FDS, RegionIoFds(56, 0, 0, 2, (IoFdEntry(0, 0, 0, 0, 0, 0),))),
     "1 entries for count 2"),
    ("not a capability", SERVER, rep(1, C.DEVICE_GET_REGION_INFO, RegionInfo(0, 0, 0, 0, 0, 0, ("x",))),
     "not a capability"),
    ("write of 9 bytes", CLIENT, cmd(1, C.REGION_WRITE_MULTI, RegionWriteMulti((RegionAccess(0, 0, 9, bytes(9)),))),
     "at most 8 bytes"),
    ("data not bytes", CLIENT, cmd(1, C.MIG_DATA_WRITE, MigDataWrite(9, 1, "a")), "data is not bytes"),
]


@pytest.mark.parametrize("sender,msg,reason", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_send_refuses(sender, msg, reason):
    with pytest.raises(LocalProtocolError, match=reason) as info:
        Connection(sender, max_data_xfer_size=64).send(msg)
    assert info.value.errno == errno.EINVAL


def test_reply_helpers():
    request = cmd(6, C.REGION_READ, RegionAccess(0, 1, 2))
    assert reply_to(request, RegionAccess(0, 1, 2, b"ab")) == rep(6, C.REGION_READ, RegionAccess(0, 1, 2, b"ab"))
    assert reply_to(MAP, Empty(), [3]).fds == (3,)
    assert error_reply(request, errno.EIO) == rep(6, C.REGION_READ, None, error_no=errno.EIO)
    with pytest.raises(LocalProtocolError):
        reply_to(rep(6, C.REGION_READ, RegionAccess(0, 1, 2)), Empty())
    with pytest.raises(LocalProtocolError):
        error_reply(BadMessage(6, C.REGION_READ, True, errno.EINVAL, "x"), errno.EINVAL)


# -- Feature data and dirty bitmaps -------------------------------------------

FEATURE_DATA = [
    (MigrationData(7), struct.pack("<Q", 7)),
    (MigDeviceStateData(3), struct.pack("<Ii", 3, -1)),
    (DmaLoggingControl(4096, ((0x1000, 0x2000), (0x10000, 0x1000))),
     struct.pack("<QIIQQQQ", 4096, 2, 0, 0x1000, 0x2000, 0x10000, 0x1000)),
    (DmaLoggingControl(4096), struct.pack("<QII", 4096, 0, 0)),
    (DmaLoggingReport(0x1000, 65 * 4096, 4096), struct.pack("<QQQ", 0x1000, 65 * 4096, 4096)),
    (DmaLoggingReport(0, 65 * 4096, 4096, bytes(range(16))),
     struct.pack("<QQQ", 0, 65 * 4096, 4096) + bytes(range(16))),
    (MigDataSizeData(1 << 40), struct.pack("<Q", 1 << 40)),
    (PrecopyInfoData(100, 20), struct.pack("<QQ", 100, 20)),
    (StateHashData(bytes(range(32))), bytes(range(32))),
]


@pytest.mark.parametrize("value,packed", FEATURE_DATA, ids=lambda v: type(v).__name__)
def test_feature_data(value, packed):
    assert value.pack() == packed
    assert type(value).unpack(packed) == value


def test_feature_numbers():
    assert [int(f) for f in Feature] == [1, 2, 6, 7, 8, 9, 0x8001, 0x8002]
    assert (F.MASK, F.GET, F.SET, F.PROBE) == (0xFFFF, 0x10000, 0x20000, 0x40000)
    assert DeviceFeature(8, F.PROBE | F.GET | Feature.QMPMIG_STATE_HASH).feature == 0x8002


@pytest.mark.parametrize("cls,packed,reason", [
    (MigrationData, struct.pack("<Q", 8), "reserved flag bits 0x8"),
    (MigDeviceStateData, struct.pack("<Ii", 8, -1), "device_state 8 is not a state"),
    (DmaLoggingControl, struct.pack("<QII", 4096, 1, 0), "num_ranges 1 with 0"),
    (DmaLoggingControl, struct.pack("<QII", 4096, 0, 1), "reserved 1"),
    (DmaLoggingControl, struct.pack("<QIIQ", 4096, 1, 0, 0), "whole number"),
    (DmaLoggingControl, struct.pack("<QII", 3000, 0, 0), "power of two"),
    (DmaLoggingReport, struct.pack("<QQQ", 0, 4096, 4096) + bytes(16), "16 bytes, 8 expected"),
    (DmaLoggingReport, struct.pack("<QQQ", 0, 4096, 0), "power of two"),
    (PrecopyInfoData, bytes(15), "shorter"),
    (MigDataSizeData, bytes(9), "1 bytes too many"),
    (StateHashData, bytes(31), "shorter"),
])
def test_feature_data_unpack_refuses(cls, packed, reason):
    with pytest.raises(RemoteProtocolError, match=reason):
        cls.unpack(packed)


@pytest.mark.parametrize("value,reason", [
    (StateHashData(bytes(31)), "digest of 31 bytes"),
    (DmaLoggingReport(0, 4096, 4096, bytes(4)), "4 bytes, 8 expected"),
    (MigDeviceStateData(9), "device_state 9 is not a state"),
    (MigrationData(1 << 3), "reserved flag bits"),
])
def test_feature_data_pack_refuses(value, reason):
    with pytest.raises(LocalProtocolError, match=reason):
        value.pack()


def test_dirty_bitmap_size():
    page = 4096
    assert [dirty_bitmap_size(n, page) for n in (0, 1, page, 64 * page, 64 * page + 1, 128 * page)] == \
        [0, 8, 8, 8, 16, 16]
    assert dirty_bitmap_size(1 << 30, page) == 32768


def test_bitmap_bits_are_little_endian_u64_words():
    bitmap = bytearray(24)
    for page in (0, 9, 63, 64, 130):
        bitmap_set(bitmap, page)
    assert struct.unpack("<3Q", bitmap) == (1 | 1 << 9 | 1 << 63, 1, 1 << 2)
    assert bitmap[7] == 0x80
    assert list(bitmap_pages(bitmap)) == [0, 9, 63, 64, 130]
    with pytest.raises(IndexError):
        bitmap_set(bitmap, 24 * 8)


@given(st.sets(st.integers(0, 64 * 5 - 1)))
def test_bitmap_pages_returns_what_was_set(pages):
    bitmap = bytearray(dirty_bitmap_size(64 * 5 * 4096, 4096))
    for page in pages:
        bitmap_set(bitmap, page)
    assert list(bitmap_pages(bitmap)) == sorted(pages)
    words = struct.unpack("<5Q", bitmap)
    assert {64 * w + b for w, word in enumerate(words) for b in range(64) if word >> b & 1} == pages


# -- Random field values ------------------------------------------------------

u32, u64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)


@given(st.one_of(
    st.builds(lambda o, r, d: (CLIENT, cmd(1, C.REGION_WRITE, RegionAccess(o, r, len(d), d))),
              u64, u32, st.binary(max_size=64)),
    st.builds(lambda a, d: (CLIENT, rep(2, C.DMA_READ, DmaAccess(a, len(d), d))), u64, st.binary(max_size=64)),
    st.builds(lambda f, o, a, s: (CLIENT, cmd(3, C.DMA_MAP, DmaMap(f, o, a, s))), st.integers(0, 3), u64, u64, u64),
    st.builds(lambda i, a, f: (SERVER, cmd(4, C.QMPMIG_PAGE_REQUEST, PageRequest(i, a, f))), u64, u64,
              st.integers(0, 1)),
    st.builds(lambda areas, t: (SERVER, rep(5, C.DEVICE_GET_REGION_INFO, RegionInfo(
        32 + 16 + 16 * len(areas) + 16, R.CAPS, 9, 32, 0, 0, (SparseMmapCap(tuple(areas)), TypeCap(*t))))),
        st.lists(st.tuples(u64, u64), max_size=3), st.tuples(u32, u32)),
))
def test_round_trip_random_fields(case):
    sender, msg = case
    assert decode(sender.peer, Connection(sender).send(msg)) == msg
