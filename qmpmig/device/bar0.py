"""BAR0 of the reference device: its registers (PROTOCOL.md, "BAR0
registers") and what a guest driver does with them.

qmpmig's rigs have no guest driver for the device, so the controller's side
plays it: map memory, point the DMA ring at it, enable the engine.
"""

from __future__ import annotations

import struct

from ..vfio_user.uapi import Field, PciRegion

#: The PCI IDs in its config space: vendor 0x1b36 (Red Hat, QEMU's),
#: device 0x7f00 + the low byte of the device id.
PCI_VENDOR, PCI_DEVICE = 0x1B36, 0x7F00
BAR0_SIZE = 4096
MAGIC = 0x47504D51  # "QMPG"
CTRL_DMA_ENABLE = 1

#: name -> (offset, format).
REGISTERS = {
    "magic": Field(0x00, "<I"),
    "device_id": Field(0x04, "<I"),
    "ctrl": Field(0x08, "<I"),
    "ring_iova": Field(0x10, "<Q"),
    "ring_size": Field(0x18, "<Q"),
    "dma_rate": Field(0x20, "<I"),
    "dma_seq": Field(0x28, "<Q"),
    "scratch": Field(0x30, "<Q"),
    "page_requests": Field(0x38, "<Q"),
    "client_losses": Field(0x40, "<Q"),
    "dma_faults": Field(0x48, "<Q"),
}
WRITABLE = frozenset({"ctrl", "ring_iova", "ring_size", "dma_rate", "scratch"})


async def write_register(client, name: str, value: int) -> None:
    reg = REGISTERS[name]
    await client.region_write(PciRegion.BAR0, reg.offset, reg.pack(value))


async def read_register(client, name: str) -> int:
    reg = REGISTERS[name]
    return reg.unpack(await client.region_read(PciRegion.BAR0, reg.offset, reg.size))


async def is_reference(client) -> bool:
    """Whether the device is qmpmig's reference device, by its PCI IDs:
    config space reads have no side effect on any device."""
    try:
        vendor, device = struct.unpack("<HH", await client.region_read(PciRegion.CONFIG, 0, 4))
    except (OSError, struct.error):
        return False
    return vendor == PCI_VENDOR and device & 0xFF00 == PCI_DEVICE


async def start_ring(client, iova: int, size: int, rate: int | None = None) -> None:
    """Point the DMA engine at [iova, iova+size) (already DMA_MAP'd) and start it."""
    await write_register(client, "ring_iova", iova)
    await write_register(client, "ring_size", size)
    if rate:
        await write_register(client, "dma_rate", rate)
    await write_register(client, "ctrl", CTRL_DMA_ENABLE)
