"""Sans-IO codec for vfio-user (QEMU docs/interop/vfio-user.rst).

One :class:`Connection` per endpoint, as in h11: ``receive_data(bytes, fds)``
buffers what the socket gave, ``next_event()`` returns a :class:`Message`, a
:class:`BadMessage` or :data:`NEED_DATA`, ``send(message)`` returns bytes.
Nothing here reads, writes or waits.

Framing (spec "Header"): ``<HHIII`` msg_id, cmd, msg_size, flags, error_no,
then ``msg_size - 16`` bytes of payload, little-endian.  The Type bits of
flags tell a command from a reply; a reply is decoded by the command it
echoes (:data:`PAYLOADS`).

Malformed input.  While msg_size lies in ``16 .. max_message_size`` the frame
boundary is known: a bad frame is consumed whole and ``next_event()``
returns a :class:`BadMessage` with its msg_id, cmd and fds, so a server can
answer with :func:`error_reply`, close the fds and carry on.  Its errno is
always EINVAL, as libvfio-user answers (unknown commands included, where
ENOSYS would also be defensible).  A msg_size outside that range loses the
framing: that BadMessage is ``fatal`` and the connection raises
:class:`RemoteProtocolError` from then on.

Where the spec leaves room, this codec:

- rejects flag bits a field does not define, non-zero reserved fields and
  header bits 6-31 (reference section 6), in both directions;
- treats a reply whose payload is None as an error reply (Error flag,
  header only); error_no may be 0 there, as the spec allows.  An error
  reply sent may echo any cmd, so that unknown commands can be answered; one
  received must answer a command this side sends;
- lets only the messages of :data:`MAX_FDS` carry fds, as many as it says;
- always sends VERSION's JSON; reads a missing ``capabilities`` as ``{}``,
  type-checks the capabilities the spec defines and passes others through;
- reads a DMA_WRITE reply of 12 bytes (spec table, u32 count) or 16
  (libvfio-user, u64 count) and sends 16;
- lays a REGION_INFO capability chain out right after the 32-byte struct;
  reads one that only goes forward, beyond the struct, within the payload,
  with no bytes after its last capability, and rejects unknown capability ids;
- reads DEVICE_GET_REGION_IO_FDS entries as 40 bytes each after the 16-byte
  head (the ``(argsz - 16) / count`` reading), either ``count`` of them or
  none (a reply cut short by the request's argsz);
- applies ``max_data_xfer_size`` and ``max_msg_fds`` to both directions; they
  are plain attributes, to be set to the negotiated values after VERSION;
- adds QMPMIG_PAGE_REQUEST (see :class:`PageRequest`).

Where a real implementation departs from the spec's letter and its meaning
is clear, a received message is taken for what it means (sent ones stay
strict); PROTOCOL.md names the implementation that needs each:

- an error reply with a payload is an error reply; the payload is dropped;
- a MIG_DATA_READ reply carrying more bytes than its ``size`` field holds
  ``size`` bytes of data; the rest is dropped.
"""

from __future__ import annotations

import enum
import json
import struct
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from errno import E2BIG, EINVAL
from typing import Callable, ClassVar, Self

from ..bytequeue import ByteQueue
from ..errors import LocalProtocolError, RemoteProtocolError
from ..migration.states import MigFlags, MigState
from .uapi import (IRQ_ACTION, IRQ_DATA, DeviceInfoFlags, FeatureFlags, IrqInfoFlags, IrqSetFlags,
                   RegionInfoFlags, DmaFlags, dirty_bitmap_size)


#: max_data_xfer_size when a VERSION does not give it (spec: 1 MiB).
DEFAULT_MAX_DATA_XFER = 1 << 20
#: What qmpmig's client and device offer: fewer, larger MIG_DATA messages
#: (the per-message cost is Python's; the peer's smaller figure wins).
QMPMIG_MAX_DATA_XFER = 4 << 20
#: The longest VERSION JSON read or sent.  The spec sets none; what QEMU
#: and libvfio-user send is a few hundred bytes, and parsed JSON takes up
#: to some 25 times its text in objects (issue 14: no allocation sized by
#: what the peer sends).
MAX_VERSION_JSON = 64 << 10
#: The most entries of a REGION_WRITE_MULTI (QEMU's VFIO_USER_MULTI_MAX).
MULTI_MAX = 200
#: The most ranges of a DMA_LOGGING_START (the kernel's LOG_MAX_RANGES,
#: drivers/vfio/vfio_main.c: more is E2BIG).
LOG_MAX_RANGES = 256


class Command(enum.IntEnum):
    """Command numbers (spec "Commands"); 14 was DIRTY_PAGES in an old
    draft and is unknown here.  QMPMIG_PAGE_REQUEST is qmpmig's."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18
    QMPMIG_PAGE_REQUEST = 0x7F01


class HeaderFlags(enum.IntFlag):
    """Header flags: bits 0-3 are the Type (0 command, 1 reply)."""

    REPLY = 1
    NO_REPLY = 0x10
    ERROR = 0x20


TYPE_MASK = 0xF
_HEADER_FLAGS = int(TYPE_MASK | HeaderFlags.NO_REPLY | HeaderFlags.ERROR)


class PageRequestFlags(enum.IntFlag):
    WRITE = 1


# Every fixed layout, once; named by its format.  The header first.
HEADER = struct.Struct("<HHIII")
_EMPTY = struct.Struct("<")
_HH = struct.Struct("<HH")              # VERSION
_HHI = struct.Struct("<HHI")            # capability header: id, version, next
_II = struct.Struct("<II")              # DEVICE_FEATURE, MIG_DATA_*, capability bodies
_Ii = struct.Struct("<Ii")              # MIG_DEVICE_STATE
_IIII = struct.Struct("<IIII")          # DEVICE_GET_INFO, DEVICE_GET_IRQ_INFO, IO_FDS head
_IIIII = struct.Struct("<IIIII")        # DEVICE_SET_IRQS
_IIQQ = struct.Struct("<IIQQ")          # DMA_UNMAP
_IIQQQ = struct.Struct("<IIQQQ")        # DMA_MAP
_IIIIQQ = struct.Struct("<IIIIQQ")      # DEVICE_GET_REGION_INFO
_Q = struct.Struct("<Q")                # wr_cnt, MIGRATION, MIG_DATA_SIZE
_QQ = struct.Struct("<QQ")              # DMA_READ/WRITE, sparse area, logging range, PRECOPY_INFO
_QQQ = struct.Struct("<QQQ")            # DMA_LOGGING_REPORT, QMPMIG_PAGE_REQUEST
_QII = struct.Struct("<QII")            # REGION_READ/WRITE, DMA_LOGGING_START
_QII8s = struct.Struct("<QII8s")        # REGION_WRITE_MULTI entry
_QQIII4xQ = struct.Struct("<QQIII4xQ")  # IO_FDS entry
_32s = struct.Struct("<32s")            # QMPMIG_STATE_HASH

#: What a malformed field or payload raises inside this module; the callers
#: turn it into BadMessage, LocalProtocolError or RemoteProtocolError.
_INVALID = (ValueError, TypeError, OverflowError, RecursionError, struct.error)

#: The most bytes one REGION_WRITE_MULTI entry writes.
_MULTI_DATA = _QII8s.size - _QII.size

#: The spec's DMA_WRITE reply table gives count as u32: 12 bytes.
_SHORT_DMA_WRITE_REPLY = 12


def _split(layout: struct.Struct, buf: bytes) -> tuple[tuple, bytes]:
    """The fixed part and the rest."""
    if len(buf) < layout.size:
        raise ValueError(f"{len(buf)} bytes, shorter than the {layout.size} of the fixed part")
    return layout.unpack_from(buf), buf[layout.size:]


def _is_bytes(value: object) -> bool:
    """bytes, or a memoryview of bytes (received migration data)."""
    return isinstance(value, bytes) or (
        isinstance(value, memoryview) and value.format == "B" and value.c_contiguous)


def _no_tail(tail: bytes) -> None:
    if tail:
        raise ValueError(f"{len(tail)} bytes too many")


def _items(layout: struct.Struct, buf: bytes) -> list[tuple]:
    """An array of ``layout`` entries filling ``buf``."""
    if len(buf) % layout.size:
        raise ValueError(f"{len(buf)} bytes are not a whole number of {layout.size}-byte entries")
    return list(layout.iter_unpack(buf))


def _check_page_size(page_size: int) -> None:
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page_size {page_size} is not a power of two")


class _Struct:
    """A payload whose fields are packed in order by LAYOUT; with TAIL the
    last field is bytes that follow it.  ``_check`` holds the rules both
    directions obey and raises ValueError."""

    LAYOUT: ClassVar[struct.Struct] = _EMPTY
    TAIL: ClassVar[bool] = False
    #: The defined bits of ``flags``; None: the payload has no flags field.
    FLAGS: ClassVar[int | None] = None

    def _encode(self) -> bytes:
        values = [getattr(self, f.name) for f in fields(self)]
        if self.TAIL:
            return self.LAYOUT.pack(*values[:-1]) + values[-1]
        return self.LAYOUT.pack(*values)

    def _pieces(self) -> list[bytes]:
        """The encoding in pieces that a transport sends with one sendmsg."""
        return [self._encode()]

    @classmethod
    def _decode(cls, buf: bytes) -> Self:
        head, tail = _split(cls.LAYOUT, buf)
        if cls.TAIL:
            return cls(*head, tail)
        _no_tail(tail)
        return cls(*head)

    @classmethod
    def sized(cls, *values: object, room: int = 0) -> Self:
        """The payload with ``argsz`` (its first field) computed, the uAPI's
        way: its own size, plus ``room`` for what the reply may add."""
        payload = cls(0, *values)
        return replace(payload, argsz=sum(map(len, payload._pieces())) + room)

    def _check(self, data: bool, limit: int) -> None:
        """``data``: the message carries ``count``/``size`` bytes of data;
        ``limit``: max_data_xfer_size."""
        if self.FLAGS is not None and int(self.flags) & ~int(self.FLAGS):
            raise ValueError(f"reserved flag bits {int(self.flags) & ~int(self.FLAGS):#x}")
        if self.TAIL and not _is_bytes(getattr(self, fields(self)[-1].name)):
            raise ValueError(f"{fields(self)[-1].name} is not bytes")


# -- Capabilities of VERSION --------------------------------------------------

def _uint(value: object) -> bool:
    return type(value) is int and value >= 0


def _boolean(value: object) -> bool:
    return type(value) is bool


def _twin_socket(value: object) -> bool:
    return (isinstance(value, dict) and _boolean(value.get("supported", False))
            and _uint(value.get("fd_index", 0)))


#: The capabilities the spec defines, with the test of their JSON type;
#: other keys pass unchecked.
CAPABILITY_TYPES: dict[str, Callable[[object], bool]] = {
    "max_msg_fds": _uint,
    "max_data_xfer_size": _uint,
    "max_dma_maps": _uint,
    "pgsizes": _uint,
    "twin_socket": _twin_socket,
    "write_multiple": _boolean,
}


# -- Payloads ------------------------------------------------------------------

@dataclass(frozen=True)
class Empty(_Struct):
    """A header-only payload: DMA_MAP, DEVICE_SET_IRQS and MIG_DATA_WRITE
    replies, DEVICE_RESET both ways."""


@dataclass(frozen=True)
class Version(_Struct):
    """VERSION (1), both ways: ``<HH`` major, minor, then NUL-terminated
    UTF-8 JSON ``{"capabilities": {...}}``, which may be absent."""

    major: int
    minor: int
    capabilities: dict = field(default_factory=dict)

    def _encode(self) -> bytes:
        text = json.dumps({"capabilities": self.capabilities}, separators=(",", ":"))
        return _HH.pack(self.major, self.minor) + text.encode() + b"\0"

    @classmethod
    def _decode(cls, buf: bytes) -> Self:
        (major, minor), text = _split(_HH, buf)
        if not text:
            return cls(major, minor)
        if len(text) > MAX_VERSION_JSON:
            raise ValueError(f"{len(text)} bytes of JSON, more than {MAX_VERSION_JSON}")
        if text[-1] != 0:
            raise ValueError("JSON is not NUL-terminated")
        try:
            doc = json.loads(text[:-1].decode())
        except UnicodeDecodeError as err:
            raise ValueError(f"JSON is not UTF-8: {err}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"bad JSON: {err}") from None
        if not isinstance(doc, dict):
            raise ValueError("JSON is not an object")
        return cls(major, minor, doc.get("capabilities", {}))

    def _check(self, data: bool, limit: int) -> None:
        if not isinstance(self.capabilities, dict):
            raise ValueError("capabilities is not an object")
        try:
            text = json.dumps({"capabilities": self.capabilities}, separators=(",", ":"))
        except (TypeError, ValueError):
            raise ValueError("capabilities are not JSON") from None
        if len(text) + 1 > MAX_VERSION_JSON:
            raise ValueError(f"{len(text) + 1} bytes of JSON, more than {MAX_VERSION_JSON}")
        for key, valid in CAPABILITY_TYPES.items():
            if key in self.capabilities and not valid(self.capabilities[key]):
                raise ValueError(f"capability {key} has the wrong type: {self.capabilities[key]!r}")


@dataclass(frozen=True)
class DmaMap(_Struct):
    """DMA_MAP (2) request, ``<IIQQQ``; argsz is always 32."""

    flags: int
    offset: int
    address: int
    size: int

    FLAGS = DmaFlags.READ | DmaFlags.WRITE

    def _encode(self) -> bytes:
        return _IIQQQ.pack(_IIQQQ.size, self.flags, self.offset, self.address, self.size)

    @classmethod
    def _decode(cls, buf: bytes) -> Self:
        (argsz, *rest), tail = _split(_IIQQQ, buf)
        if argsz != _IIQQQ.size:
            raise ValueError(f"argsz {argsz}, not {_IIQQQ.size}")
        _no_tail(tail)
        return cls(*rest)


@dataclass(frozen=True)
class DmaUnmap(_Struct):
    """DMA_UNMAP (3), both ways, ``<IIQQ``; flags are unused: all reserved."""

    argsz: int
    flags: int
    address: int
    size: int

    LAYOUT = _IIQQ
    FLAGS = 0


@dataclass(frozen=True)
class DeviceInfo(_Struct):
    """DEVICE_GET_INFO (4), both ways, ``<IIII``."""

    argsz: int
    flags: int
    num_regions: int
    num_irqs: int

    LAYOUT = _IIII
    FLAGS = DeviceInfoFlags.RESET | DeviceInfoFlags.PCI


@dataclass(frozen=True)
class TypeCap(_Struct):
    """REGION_INFO capability TYPE (id 2, version 1): type, subtype."""

    type: int
    subtype: int

    ID: ClassVar[int] = 2
    VERSION: ClassVar[int] = 1
    LAYOUT = _II

    @classmethod
    def _read(cls, buf: bytes) -> tuple[Self, int]:
        """The capability whose body starts ``buf``, and the body's size."""
        return cls(*_split(_II, buf)[0]), _II.size


@dataclass(frozen=True)
class SparseMmapCap(_Struct):
    """REGION_INFO capability SPARSE_MMAP (id 1, version 1): nr_areas,
    reserved, then nr_areas ``<QQ`` (offset, size)."""

    areas: tuple[tuple[int, int], ...]

    ID: ClassVar[int] = 1
    VERSION: ClassVar[int] = 1

    def _encode(self) -> bytes:
        return _II.pack(len(self.areas), 0) + b"".join(_QQ.pack(*area) for area in self.areas)

    @classmethod
    def _read(cls, buf: bytes) -> tuple[Self, int]:
        (nr_areas, reserved), rest = _split(_II, buf)
        if reserved:
            raise ValueError("SPARSE_MMAP reserved field is not zero")
        size = nr_areas * _QQ.size
        if len(rest) < size:
            raise ValueError(f"SPARSE_MMAP with {nr_areas} areas runs past the payload")
        return cls(tuple(_items(_QQ, rest[:size]))), _II.size + size


#: (id, version) -> capability class.
CAPABILITIES = {(cap.ID, cap.VERSION): cap for cap in (SparseMmapCap, TypeCap)}


@dataclass(frozen=True)
class RegionInfo(_Struct):
    """DEVICE_GET_REGION_INFO (5), both ways: ``<IIIIQQ``, then the
    capability chain.  With ``caps`` the encoder writes argsz, cap_offset,
    each ``next`` and the CAPS flag itself; without, the fields as given (a
    reply cut short by the request's argsz has CAPS and no chain)."""

    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    caps: tuple[SparseMmapCap | TypeCap, ...] = ()

    FLAGS = RegionInfoFlags.READ | RegionInfoFlags.WRITE | RegionInfoFlags.MMAP | RegionInfoFlags.CAPS

    def _encode(self) -> bytes:
        head = (self.argsz, self.flags, self.index, self.cap_offset, self.size, self.offset)
        if not self.caps:
            return _IIIIQQ.pack(*head)
        chain = bytearray()
        for i, cap in enumerate(self.caps):
            body = cap._encode()
            end = _IIIIQQ.size + len(chain) + _HHI.size + len(body)
            chain += _HHI.pack(cap.ID, cap.VERSION, end if i + 1 < len(self.caps) else 0) + body
        return _IIIIQQ.pack(_IIIIQQ.size + len(chain), self.flags | RegionInfoFlags.CAPS,
                            self.index, _IIIIQQ.size, self.size, self.offset) + chain

    @classmethod
    def _decode(cls, buf: bytes) -> Self:
        head, tail = _split(_IIIIQQ, buf)
        info = cls(*head)
        if info.cap_offset and not info.flags & RegionInfoFlags.CAPS:
            raise ValueError("cap_offset without the CAPS flag")
        caps, pos, floor = [], info.cap_offset, _IIIIQQ.size
        while pos:
            if pos < floor:
                raise ValueError(f"capability chain goes back to {pos}, before {floor}")
            if pos + _HHI.size > len(buf):
                raise ValueError(f"capability at {pos} lies outside the {len(buf)}-byte payload")
            cap_id, version, nxt = _HHI.unpack_from(buf, pos)
            if (cap_id, version) not in CAPABILITIES:
                raise ValueError(f"unknown capability id {cap_id} version {version}")
            cap, size = CAPABILITIES[cap_id, version]._read(buf[pos + _HHI.size:])
            caps.append(cap)
            floor, pos = pos + _HHI.size + size, nxt
        _no_tail(buf[floor:])
        return replace(info, caps=tuple(caps))

    def _check(self, data: bool, limit: int) -> None:
        super()._check(data, limit)
        if not all(type(cap) in CAPABILITIES.values() for cap in self.caps):
            raise ValueError("caps holds something that is not a capability")


@dataclass(frozen=True)
class IoFdEntry(_Struct):
    """One DEVICE_GET_REGION_IO_FDS entry, ``<QQIII4xQ`` (40 bytes);
    ``datamatch`` is user_data for type 1 (IOREGIONFD)."""

    offset: int
    size: int
    fd_index: int
    type: int
    flags: int
    datamatch: int

    LAYOUT = _QQIII4xQ


@dataclass(frozen=True)
class RegionIoFds(_Struct):
    """DEVICE_GET_REGION_IO_FDS (6), both ways: ``<IIII`` head, then, in a
    reply, ``count`` entries."""

    argsz: int
    flags: int
    index: int
    count: int
    entries: tuple[IoFdEntry, ...] = ()

    FLAGS = 0

    def _encode(self) -> bytes:
        return (_IIII.pack(self.argsz, self.flags, self.index, self.count)
                + b"".join(entry._encode() for entry in self.entries))

    @classmethod
    def _decode(cls, buf: bytes) -> Self:
        head, tail = _split(_IIII, buf)
        return cls(*head, tuple(IoFdEntry(*item) for item in _items(_QQIII4xQ, tail)))

    def _check(self, data: bool, limit: int) -> None:
        super()._check(data, limit)
        if self.entries and len(self.entries) != self.count:
            raise ValueError(f"{len(self.entries)} entries for count {self.count}")
        if not all(type(entry) is IoFdEntry for entry in self.entries):
            raise ValueError("entries holds something that is not an IoFdEntry")


@dataclass(frozen=True)
class IrqInfo(_Struct):
    """DEVICE_GET_IRQ_INFO (7), both ways, ``<IIII``."""

    argsz: int
    flags: int
    index: int
    count: int

    LAYOUT = _IIII
    FLAGS = IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED | IrqInfoFlags.NORESIZE


@dataclass(frozen=True)
class SetIrqs(_Struct):
    """DEVICE_SET_IRQS (8) request, ``<IIIII`` then data; argsz is the whole
    payload, data is ``count`` booleans with DATA_BOOL and absent otherwise
    (eventfds travel as fds)."""

    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""

    LAYOUT = _IIIII
    TAIL = True
    FLAGS = IRQ_DATA | IRQ_ACTION

    def _check(self, data: bool, limit: int) -> None:
        super()._check(data, limit)
        if (self.flags & IRQ_DATA).bit_count() != 1 or (self.flags & IRQ_ACTION).bit_count() != 1:
            raise ValueError(f"flags {self.flags:#x} need one DATA_* and one ACTION_* bit")
        if self.argsz != _IIIII.size + len(self.data):
            raise ValueError(f"argsz {self.argsz} for a {_IIIII.size + len(self.data)}-byte payload")
        want = self.count if self.flags & IrqSetFlags.DATA_BOOL else 0
        if len(self.data) != want:
            raise ValueError(f"{len(self.data)} bytes of data, {want} expected")


class _Transfer(_Struct):
    """A data transfer: ``data`` holds LENGTH bytes in the message that
    carries the data, none in the other one of the pair."""

    TAIL = True
    LENGTH: ClassVar[str] = "count"

    def _pieces(self) -> list[bytes]:
        """The fixed part, and the data as it is: never copied here."""
        values = [getattr(self, f.name) for f in fields(self)]
        return [self.LAYOUT.pack(*values[:-1]), values[-1]]

    def _check(self, data: bool, limit: int) -> None:
        super()._check(data, limit)
        length = getattr(self, self.LENGTH)
        if length > limit:
            raise ValueError(f"{self.LENGTH} {length} exceeds max_data_xfer_size {limit}")
        if len(self.data) != (length if data else 0):
            raise ValueError(f"{len(self.data)} bytes of data for {self.LENGTH} {length}"
                             if data else f"{len(self.data)} bytes of data where none belongs")


@dataclass(frozen=True)
class RegionAccess(_Transfer):
    """REGION_READ (9) and REGION_WRITE (10), both ways: ``<QII`` then data."""

    offset: int
    region: int
    count: int
    data: bytes = b""

    LAYOUT = _QII


@dataclass(frozen=True)
class DmaAccess(_Transfer):
    """DMA_READ (11) and DMA_WRITE (12), both ways: ``<QQ`` then data."""

    address: int
    count: int
    data: bytes = b""

    LAYOUT = _QQ


@dataclass(frozen=True)
class RegionWriteMulti(_Struct):
    """REGION_WRITE_MULTI (15) request: wr_cnt ``<Q``, then wr_cnt 24-byte
    ``<QII8s`` entries (offset, region, count <= 8, data)."""

    writes: tuple[RegionAccess, ...]

    def _encode(self) -> bytes:
        return _Q.pack(len(self.writes)) + b"".join(
            _QII8s.pack(w.offset, w.region, w.count, w.data) for w in self.writes)

    @classmethod
    def _decode(cls, buf: bytes) -> Self:
        (wr_cnt,), tail = _split(_Q, buf)
        if wr_cnt > MULTI_MAX or len(tail) > MULTI_MAX * _QII8s.size:
            raise ValueError(f"wr_cnt {wr_cnt} and {len(tail)} bytes of entries: at most {MULTI_MAX} entries")
        items = _items(_QII8s, tail)
        if len(items) != wr_cnt:
            raise ValueError(f"wr_cnt {wr_cnt} with {len(items)} entries")
        return cls(tuple(RegionAccess(offset, region, count, data[:count])
                         for offset, region, count, data in items))

    def _check(self, data: bool, limit: int) -> None:
        if len(self.writes) > MULTI_MAX:
            raise ValueError(f"{len(self.writes)} writes, more than {MULTI_MAX}")
        for write in self.writes:
            if type(write) is not RegionAccess or write.count > _MULTI_DATA:
                raise ValueError(f"not a write of at most 8 bytes: {write!r}")
            write._check(True, limit)


@dataclass(frozen=True)
class RegionWriteMultiReply(_Struct):
    """REGION_WRITE_MULTI (15) reply: wr_cnt, the writes completed."""

    wr_cnt: int

    LAYOUT = _Q


@dataclass(frozen=True)
class DeviceFeature(_Struct):
    """DEVICE_FEATURE (16), both ways: ``<II`` argsz, flags, then the
    feature's data (see the ``*Data`` classes)."""

    argsz: int
    flags: int
    data: bytes = b""

    LAYOUT = _II
    TAIL = True
    FLAGS = FeatureFlags.MASK | FeatureFlags.GET | FeatureFlags.SET | FeatureFlags.PROBE

    @property
    def feature(self) -> int:
        return int(self.flags) & 0xFFFF

    def _check(self, data: bool, limit: int) -> None:
        super()._check(data, limit)
        if self.flags & FeatureFlags.GET and self.flags & FeatureFlags.SET \
                and not self.flags & FeatureFlags.PROBE:
            raise ValueError("GET and SET together need PROBE")


@dataclass(frozen=True)
class MigDataRead(_Transfer):
    """MIG_DATA_READ (17), both ways: ``<II`` argsz, size, then (reply) data."""

    argsz: int
    size: int
    data: bytes = b""

    LAYOUT = _II
    LENGTH = "size"


@dataclass(frozen=True)
class MigDataWrite(MigDataRead):
    """MIG_DATA_WRITE (18) request: ``<II`` argsz, size, then size bytes."""

    data: bytes


@dataclass(frozen=True)
class PageRequest(_Struct):
    """QMPMIG_PAGE_REQUEST (0x7F01), qmpmig's extension, ``<QQQ``:
    request_id, iova, flags (WRITE=1).  The server sends it as a command
    when its DMA meets a page that is not present (an IO page fault); the
    client replies with the same payload once the page is present, or with
    an error reply."""

    request_id: int
    iova: int
    flags: int

    LAYOUT = _QQQ
    FLAGS = PageRequestFlags.WRITE


# -- DEVICE_FEATURE data -------------------------------------------------------

class _FeatureData(_Struct):
    """The data of one feature, carried in DeviceFeature.data."""

    def pack(self) -> bytes:
        try:
            self._check(False, sys.maxsize)
            return self._encode()
        except _INVALID as err:
            raise LocalProtocolError(f"{type(self).__name__}: {err}") from err

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        try:
            value = cls._decode(data)
            value._check(False, sys.maxsize)
        except _INVALID as err:
            raise RemoteProtocolError(f"{cls.__name__}: {err}") from err
        return value


@dataclass(frozen=True)
class MigrationData(_FeatureData):
    """MIGRATION (GET): the device's migration flags, ``<Q``."""

    flags: int

    LAYOUT = _Q
    FLAGS = MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY


@dataclass(frozen=True)
class MigDeviceStateData(_FeatureData):
    """MIG_DEVICE_STATE (GET/SET): device_state, data_fd (unused), ``<Ii``."""

    device_state: int
    data_fd: int = -1

    LAYOUT = _Ii

    def _check(self, data: bool, limit: int) -> None:
        if self.device_state not in MigState._value2member_map_:
            raise ValueError(f"device_state {self.device_state} is not a state")


@dataclass(frozen=True)
class DmaLoggingControl(_FeatureData):
    """DMA_LOGGING_START (SET): page_size, num_ranges, reserved ``<QII``,
    then num_ranges ``<QQ`` (iova, length); no ranges means all of memory."""

    page_size: int
    ranges: tuple[tuple[int, int], ...] = ()

    def _encode(self) -> bytes:
        return _QII.pack(self.page_size, len(self.ranges), 0) + b"".join(
            _QQ.pack(*r) for r in self.ranges)

    @classmethod
    def _decode(cls, buf: bytes) -> Self:
        (page_size, num_ranges, reserved), tail = _split(_QII, buf)
        if num_ranges > LOG_MAX_RANGES:
            raise RemoteProtocolError(f"{num_ranges} ranges, more than {LOG_MAX_RANGES}", E2BIG)
        if len(tail) > LOG_MAX_RANGES * _QQ.size:
            raise RemoteProtocolError(f"{len(tail)} bytes of ranges, more than {LOG_MAX_RANGES} ranges", E2BIG)
        ranges = tuple(_items(_QQ, tail))
        if reserved or len(ranges) != num_ranges:
            raise ValueError(f"reserved {reserved}, num_ranges {num_ranges} with {len(ranges)} ranges")
        return cls(page_size, ranges)

    def _check(self, data: bool, limit: int) -> None:
        _check_page_size(self.page_size)
        if len(self.ranges) > LOG_MAX_RANGES:
            raise ValueError(f"{len(self.ranges)} ranges, more than {LOG_MAX_RANGES}")


@dataclass(frozen=True)
class DmaLoggingReport(_FeatureData):
    """DMA_LOGGING_REPORT (GET): iova, length, page_size ``<QQQ``; the reply
    appends the dirty bitmap (:func:`dirty_bitmap_size` bytes)."""

    iova: int
    length: int
    page_size: int
    bitmap: bytes = b""

    LAYOUT = _QQQ
    TAIL = True

    def _check(self, data: bool, limit: int) -> None:
        _check_page_size(self.page_size)
        size = dirty_bitmap_size(self.length, self.page_size)
        if len(self.bitmap) not in (0, size):
            raise ValueError(f"bitmap of {len(self.bitmap)} bytes, {size} expected")


@dataclass(frozen=True)
class MigDataSizeData(_FeatureData):
    """MIG_DATA_SIZE (GET): stop_copy_length, ``<Q``."""

    stop_copy_length: int

    LAYOUT = _Q


@dataclass(frozen=True)
class PrecopyInfoData(_FeatureData):
    """QMPMIG_PRECOPY_INFO (GET): initial_bytes, dirty_bytes, ``<QQ``."""

    initial_bytes: int
    dirty_bytes: int

    LAYOUT = _QQ


@dataclass(frozen=True)
class StateHashData(_FeatureData):
    """QMPMIG_STATE_HASH (GET): a 32-byte digest of the device's state."""

    digest: bytes

    LAYOUT = _32s

    def _check(self, data: bool, limit: int) -> None:
        if len(self.digest) != _32s.size:
            raise ValueError(f"digest of {len(self.digest)} bytes, not {_32s.size}")


# -- Messages -----------------------------------------------------------------

_C = Command

#: cmd -> (request payload class, reply payload class).
PAYLOADS: dict[Command, tuple[type[_Struct], type[_Struct]]] = {
    _C.VERSION:                  (Version, Version),
    _C.DMA_MAP:                  (DmaMap, Empty),
    _C.DMA_UNMAP:                (DmaUnmap, DmaUnmap),
    _C.DEVICE_GET_INFO:          (DeviceInfo, DeviceInfo),
    _C.DEVICE_GET_REGION_INFO:   (RegionInfo, RegionInfo),
    _C.DEVICE_GET_REGION_IO_FDS: (RegionIoFds, RegionIoFds),
    _C.DEVICE_GET_IRQ_INFO:      (IrqInfo, IrqInfo),
    _C.DEVICE_SET_IRQS:          (SetIrqs, Empty),
    _C.REGION_READ:              (RegionAccess, RegionAccess),
    _C.REGION_WRITE:             (RegionAccess, RegionAccess),
    _C.DMA_READ:                 (DmaAccess, DmaAccess),
    _C.DMA_WRITE:                (DmaAccess, DmaAccess),
    _C.DEVICE_RESET:             (Empty, Empty),
    _C.REGION_WRITE_MULTI:       (RegionWriteMulti, RegionWriteMultiReply),
    _C.DEVICE_FEATURE:           (DeviceFeature, DeviceFeature),
    _C.MIG_DATA_READ:            (MigDataRead, MigDataRead),
    _C.MIG_DATA_WRITE:           (MigDataWrite, Empty),
    _C.QMPMIG_PAGE_REQUEST:      (PageRequest, PageRequest),
}

#: (cmd, reply?) of the messages that end in ``count``/``size`` bytes of data;
#: the other message of each pair has the fixed part only.
CARRIES_DATA = frozenset({
    (_C.REGION_READ, True), (_C.REGION_WRITE, False),
    (_C.DMA_READ, True), (_C.DMA_WRITE, False),
    (_C.MIG_DATA_READ, True), (_C.MIG_DATA_WRITE, False),
})

#: The messages whose data is migration data: it stays a memoryview of the
#: received buffer (a MiB per message, read and written once each way).
MIGRATION_DATA = frozenset({(_C.MIG_DATA_READ, True), (_C.MIG_DATA_WRITE, False)})

#: (cmd, reply?) -> how many fds the message may carry (reference section 1);
#: no other message carries any.  ``max_msg_fds`` caps them all.
MAX_FDS: dict[tuple[Command, bool], Callable[[_Struct], int]] = {
    (_C.VERSION, True): lambda p: 1,
    (_C.DMA_MAP, False): lambda p: 1,
    (_C.DEVICE_GET_REGION_INFO, True): lambda p: 1 if p.flags & RegionInfoFlags.MMAP else 0,
    (_C.DEVICE_GET_REGION_IO_FDS, True): lambda p: len(p.entries),
    (_C.DEVICE_SET_IRQS, False): lambda p: p.count if p.flags & IrqSetFlags.DATA_EVENTFD else 0,
}

#: The largest fixed part of a payload: REGION_INFO's struct, or
#: DEVICE_FEATURE's head with DMA_LOGGING_REPORT's.
MAX_FIXED_PART = _IIIIQQ.size


class Party(enum.Enum):
    CLIENT = "client"
    SERVER = "server"

    @property
    def peer(self) -> Party:
        return Party.SERVER if self is Party.CLIENT else Party.CLIENT


_SERVER_COMMANDS = frozenset({_C.DMA_READ, _C.DMA_WRITE, _C.QMPMIG_PAGE_REQUEST})
#: The commands each role sends; it replies to the other role's.
COMMANDS = {Party.CLIENT: frozenset(Command) - _SERVER_COMMANDS, Party.SERVER: _SERVER_COMMANDS}


@dataclass(frozen=True)
class Message:
    """A command or reply.  A reply whose payload is None is an error reply:
    Error flag set, header only, ``error_no`` (possibly 0) the errno."""

    msg_id: int
    cmd: Command | int
    payload: object
    reply: bool = False
    error_no: int = 0
    no_reply: bool = False
    fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class BadMessage:
    """A frame the peer got wrong.  Close ``fds``; answer a command (unless
    ``no_reply``) with :func:`error_reply`.  ``fatal``: the framing is lost
    and the connection must be closed."""

    msg_id: int
    cmd: Command | int
    reply: bool
    errno: int
    reason: str
    fds: tuple[int, ...] = ()
    fatal: bool = False
    no_reply: bool = False


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


#: next_event(): no whole frame is buffered yet.
NEED_DATA = _Sentinel.NEED_DATA


def _command(cmd: int) -> Command | int:
    try:
        return Command(cmd)
    except ValueError:
        return cmd


def _payload_class(cmd: int, reply: bool, sender: Party) -> type[_Struct]:
    """The payload class of a message ``sender`` may send, or ValueError."""
    commander = sender.peer if reply else sender
    named = _command(cmd)
    if not isinstance(named, Command):
        raise ValueError("unknown command")
    if named not in COMMANDS[commander]:
        raise ValueError(f"not a command a {commander.value} sends")
    return PAYLOADS[named][reply]


def error_reply(msg: Message | BadMessage, errno: int) -> Message:
    """The error reply to a command: same msg_id and cmd, header only."""
    if msg.reply:
        raise LocalProtocolError(f"msg_id {msg.msg_id} is a reply and gets no reply")
    return Message(msg.msg_id, msg.cmd, None, reply=True, error_no=errno)


def reply_to(msg: Message, payload: object, fds: Sequence[int] = ()) -> Message:
    """The reply to a command, echoing its msg_id and cmd."""
    if msg.reply:
        raise LocalProtocolError(f"msg_id {msg.msg_id} is a reply and gets no reply")
    return Message(msg.msg_id, msg.cmd, payload, reply=True, fds=tuple(fds))


class Connection:
    """One endpoint of a vfio-user connection, without I/O."""

    def __init__(self, role: Party, max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER, max_msg_fds: int = 1):
        self.role = role
        #: The largest count/size of a data transfer, either way.
        self.max_data_xfer_size = max_data_xfer_size
        #: The most fds one message may carry, either way.
        self.max_msg_fds = max_msg_fds
        self._received = ByteQueue()     # not yet decoded
        self._offset = 0                 # stream position of its first byte
        self._fds: deque[tuple[int, int, tuple[int, ...]]] = deque()  # (start, end, fds)
        self._broken = False

    @property
    def max_message_size(self) -> int:
        """The largest msg_size either way: header, largest fixed part and
        max_data_xfer_size, the room that data, capability chains, IO_FDS
        entries, logging ranges and bitmaps, and VERSION's JSON all share."""
        return HEADER.size + MAX_FIXED_PART + self.max_data_xfer_size

    @property
    def pending_fds(self) -> tuple[int, ...]:
        """Fds received but not yet handed out with a message: close them
        when giving up on the connection."""
        return tuple(fd for _, _, fds in self._fds for fd in fds)

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Buffer bytes as read, with the fds that came with them: they
        belong to the first message whose header starts in ``data``, or to
        the one ``data`` continues if none starts there.  Once the framing
        is lost this raises RemoteProtocolError and the fds stay the caller's."""
        if self._broken:
            raise RemoteProtocolError("the peer broke the framing; close the connection")
        start = self._offset + len(self._received)
        if fds:
            self._fds.append((start, start + len(data), tuple(fds)))
        self._received.append(data)

    def next_event(self) -> Message | BadMessage | _Sentinel:
        """The next message, a BadMessage for a malformed frame, or
        NEED_DATA; RemoteProtocolError once the framing is lost."""
        if self._broken:
            raise RemoteProtocolError("the peer broke the framing; close the connection")
        if len(self._received) < HEADER.size:
            return NEED_DATA
        msg_id, cmd, msg_size, flags, error_no = HEADER.unpack_from(self._received.front(HEADER.size))
        reply, no_reply = flags & TYPE_MASK == HeaderFlags.REPLY, bool(flags & HeaderFlags.NO_REPLY)
        if not HEADER.size <= msg_size <= self.max_message_size:
            self._broken = True
            fds = self.pending_fds
            self._fds.clear()
            return BadMessage(msg_id, _command(cmd), reply, EINVAL,
                              f"msg_size {msg_size} outside {HEADER.size}..{self.max_message_size}",
                              fds, fatal=True, no_reply=no_reply)
        if len(self._received) < msg_size:
            return NEED_DATA
        body = self._received.take(msg_size)[HEADER.size:]
        fds = self._claim_fds(self._offset, self._offset + msg_size)
        self._offset += msg_size
        try:
            return self._decode(msg_id, cmd, flags, error_no, body, fds)
        except _INVALID as err:
            return BadMessage(msg_id, _command(cmd), reply, EINVAL, f"{_name(cmd, reply)}: {err}",
                              fds, no_reply=no_reply)

    def send(self, msg: Message) -> bytes:
        """The bytes of ``msg``; LocalProtocolError if it is not valid."""
        return b"".join(self.send_pieces(msg))

    def send_pieces(self, msg: Message) -> list[bytes]:
        """:meth:`send`'s bytes in pieces, the data not copied (for sendmsg)."""
        try:
            flags = (HeaderFlags.REPLY if msg.reply else 0) | (HeaderFlags.NO_REPLY if msg.no_reply else 0)
            if msg.reply and msg.no_reply:
                raise ValueError("No_reply is for commands")
            if msg.payload is None:
                if not msg.reply or msg.fds:
                    raise ValueError("only a reply may be an error reply, and it carries no fds")
                body, flags = [], flags | HeaderFlags.ERROR
            else:
                if msg.error_no:
                    raise ValueError("error_no belongs to error replies (payload None)")
                cls = _payload_class(msg.cmd, msg.reply, sender=self.role)
                if type(msg.payload) is not cls:
                    raise ValueError(f"payload must be {cls.__name__}, not {type(msg.payload).__name__}")
                self._check(msg)
                try:
                    body = msg.payload._pieces()
                except struct.error:
                    raise ValueError("a field does not fit its width in the layout") from None
            if not 0 <= msg.msg_id <= 0xFFFF:
                raise ValueError("msg_id is not a u16")
            size = HEADER.size + sum(map(len, body))
            if size > self.max_message_size:
                raise ValueError(f"{size} bytes exceed max_message_size {self.max_message_size}")
            return [HEADER.pack(msg.msg_id, msg.cmd, size, flags, msg.error_no), *body]
        except _INVALID as err:
            raise LocalProtocolError(f"msg_id {msg.msg_id} {_name(msg.cmd, msg.reply)}: {err}") from err

    def _claim_fds(self, start: int, end: int) -> tuple[int, ...]:
        """The fds of the frame at stream positions [start, end): those of
        a chunk that starts at or before it, or lies inside it."""
        claimed: list[int] = []
        while self._fds:
            a, b, fds = self._fds[0]
            if not (a <= start or (a < end and b <= end)):
                break
            claimed += fds
            self._fds.popleft()
        return tuple(claimed)

    def _decode(self, msg_id: int, cmd: int, flags: int, error_no: int, body: memoryview,
                fds: tuple[int, ...]) -> Message:
        if flags & ~_HEADER_FLAGS or flags & TYPE_MASK > HeaderFlags.REPLY:
            raise ValueError(f"reserved header flags or Type in {flags:#x}")
        reply, error = flags & TYPE_MASK == HeaderFlags.REPLY, bool(flags & HeaderFlags.ERROR)
        if reply and flags & HeaderFlags.NO_REPLY:
            raise ValueError("No_reply set on a reply")
        if not reply and (error or error_no):
            raise ValueError("Error flag or error_no set on a command")
        cls = _payload_class(cmd, reply, sender=self.role.peer)
        if (cmd, reply) not in MIGRATION_DATA:
            body = body.tobytes()
        if error:
            if fds:
                raise ValueError("an error reply carries no fds")
            return Message(msg_id, Command(cmd), None, reply=True, error_no=error_no)   # body: tolerated
        if error_no:
            raise ValueError("error_no without the Error flag")
        if (cmd, reply) == (_C.DMA_WRITE, True) and len(body) == _SHORT_DMA_WRITE_REPLY:
            body += bytes(_QQ.size - _SHORT_DMA_WRITE_REPLY)   # u32 count, little-endian
        payload = cls._decode(body)
        if (cmd, reply) == (_C.MIG_DATA_READ, True) and len(payload.data) > payload.size:
            payload = replace(payload, data=payload.data[:payload.size])      # tolerated
        msg = Message(msg_id, Command(cmd), payload, reply,
                      no_reply=bool(flags & HeaderFlags.NO_REPLY), fds=fds)
        self._check(msg)
        return msg

    def _check(self, msg: Message) -> None:
        """The rules a message obeys either way, beyond its layout."""
        msg.payload._check((msg.cmd, msg.reply) in CARRIES_DATA, self.max_data_xfer_size)
        allowed = min(self.max_msg_fds, MAX_FDS.get((msg.cmd, msg.reply), lambda p: 0)(msg.payload))
        if len(msg.fds) > allowed:
            raise ValueError(f"{len(msg.fds)} fds, at most {allowed} allowed")


def _name(cmd: int, reply: bool) -> str:
    """A message's name for error text: ``REGION_READ reply``, ``cmd 99``."""
    named = _command(cmd)
    return f"{named.name if isinstance(named, Command) else f'cmd {cmd}'} {'reply' if reply else 'command'}"
