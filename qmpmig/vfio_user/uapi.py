"""The Linux VFIO uAPI as vfio-user carries it: every number, flag and
layout that a client and a device both need, defined once.

vfio-user reuses the kernel's ``include/uapi/linux/vfio.h`` for region and
IRQ indices, the flags of DEVICE_GET_INFO, REGION_INFO, IRQ_INFO and
SET_IRQS, DEVICE_FEATURE and its feature numbers, the v1 migration region
(``struct vfio_device_migration_info``) and the DMA dirty bitmap.  The codec
(:mod:`.codec`) frames them; the client, the reference device and the tools
import them from here.  The migration states and flags themselves are in
:mod:`qmpmig.migration.states`.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Iterator
from typing import NamedTuple

#: The page the dirty log, the DMA maps and guest RAM copies count in.
PAGE_SIZE = 4096


class PciRegion(enum.IntEnum):
    """VFIO_PCI_*_REGION_INDEX; device-specific regions follow NUM_REGIONS."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


#: VFIO_PCI_NUM_REGIONS: the index of the first device-specific region.
PCI_NUM_REGIONS = 9


class PciIrq(enum.IntEnum):
    """VFIO_PCI_*_IRQ_INDEX."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS = 5


class DmaFlags(enum.IntFlag):
    """DMA_MAP flags (VFIO_DMA_MAP_FLAG_READ/WRITE)."""

    READ = 1
    WRITE = 2


class DeviceInfoFlags(enum.IntFlag):
    RESET = 1
    PCI = 2


class RegionInfoFlags(enum.IntFlag):
    READ = 1
    WRITE = 2
    MMAP = 4
    CAPS = 8


class IrqInfoFlags(enum.IntFlag):
    EVENTFD = 1
    MASKABLE = 2
    AUTOMASKED = 4
    NORESIZE = 8


class IrqSetFlags(enum.IntFlag):
    """DEVICE_SET_IRQS flags: exactly one DATA_* and one ACTION_* bit."""

    DATA_NONE = 1
    DATA_BOOL = 2
    DATA_EVENTFD = 4
    ACTION_MASK = 8
    ACTION_UNMASK = 0x10
    ACTION_TRIGGER = 0x20


IRQ_DATA = IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_BOOL | IrqSetFlags.DATA_EVENTFD
IRQ_ACTION = IrqSetFlags.ACTION_MASK | IrqSetFlags.ACTION_UNMASK | IrqSetFlags.ACTION_TRIGGER


class FeatureFlags(enum.IntFlag):
    """DEVICE_FEATURE flags: the feature index in bits 0-15, then the method."""

    MASK = 0xFFFF
    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


class Feature(enum.IntEnum):
    """Feature indices (Linux VFIO_DEVICE_FEATURE_*); 0x8000 and up are qmpmig's."""

    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8
    MIG_DATA_SIZE = 9
    #: GET: initial_bytes, dirty_bytes: the numbers of Linux VFIO_MIG_GET_PRECOPY_INFO.
    QMPMIG_PRECOPY_INFO = 0x8001
    #: GET: a digest of the device's internal state.
    QMPMIG_STATE_HASH = 0x8002


# -- the v1 migration region (kernels 5.8-5.17) ----------------------------------

#: VFIO_REGION_TYPE_MIGRATION_DEPRECATED, VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED.
MIGRATION_REGION_TYPE = (3, 1)


class Field(NamedTuple):
    """One field of a register block: its offset and its struct format."""

    offset: int
    format: str

    @property
    def size(self) -> int:
        return struct.calcsize(self.format)

    def pack(self, value: int) -> bytes:
        return struct.pack(self.format, value)

    def unpack(self, data: bytes) -> int:
        return struct.unpack(self.format, data)[0]


#: struct vfio_device_migration_info, at offset 0 of the migration region.
MIGRATION_INFO = {
    "device_state": Field(0, "<I"),
    "reserved": Field(4, "<I"),
    "pending_bytes": Field(8, "<Q"),
    "data_offset": Field(16, "<Q"),
    "data_size": Field(24, "<Q"),
}


def field_at(fields: dict[str, Field], offset: int, size: int) -> str | None:
    """The name of the field an access of ``size`` bytes at ``offset`` hits
    whole, at its own width; None for any other access."""
    for name, field in fields.items():
        if field.offset == offset and field.size == size:
            return name
    return None


# -- the DMA dirty bitmap (VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT) ----------------

def dirty_bitmap_size(length: int, page_size: int) -> int:
    """Bytes of a DMA_LOGGING_REPORT bitmap: whole u64 words, a bit a page."""
    return -(-length // (page_size * 64)) * 8


def bitmap_set(bitmap: bytearray, n: int) -> None:
    """Mark page ``n``: word n // 64, bit n % 64 of little-endian u64 words,
    which is byte n // 8, bit n % 8 (iommufd's iova_bitmap.c)."""
    bitmap[n // 8] |= 1 << (n % 8)


#: A byte with a page marked: the scan of a GiB's bitmap skips the rest in C.
_NONZERO = re.compile(rb"[^\x00]")


def bitmap_pages(bitmap: bytes) -> Iterator[int]:
    """The pages marked in ``bitmap``, ascending."""
    for found in _NONZERO.finditer(bitmap):
        byte, at = found.group()[0], found.start() * 8
        for bit in range(8):
            if byte >> bit & 1:
                yield at + bit
