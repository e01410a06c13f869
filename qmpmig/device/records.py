"""The records the reference device's DMA engine writes into client memory.

Record ``seq`` of device ``device_id`` is 64 bytes at slot ``seq % slots``
of the ring the driver programmed: magic, device_id, seq, 40 bytes derived
from (device_id, seq), and a CRC-32 of the rest.  Anyone holding the guest
RAM can recompute and check every record the device says it wrote.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

RECORD = struct.Struct("<4sIQ40sI4x")
SIZE = RECORD.size
MAGIC = b"QREC"


def record(device_id: int, seq: int) -> bytes:
    fill = hashlib.blake2b(struct.pack("<IQ", device_id, seq), digest_size=40).digest()
    head = struct.pack("<4sIQ40s", MAGIC, device_id, seq, fill)
    return RECORD.pack(MAGIC, device_id, seq, fill, zlib.crc32(head))


def verify(ring: bytes | memoryview, device_id: int, written: int) -> list[str]:
    """Check that ``ring`` holds the newest record of every slot after the
    device wrote records 0..written-1 (or one written since, in its slot);
    return what is wrong."""
    slots = len(ring) // SIZE
    errors = []
    for seq in range(max(0, written - slots), written):
        slot = seq % slots
        got = bytes(ring[slot * SIZE:(slot + 1) * SIZE])
        if got != record(device_id, seq) and not _newer(got, device_id, seq, slots):
            magic, dev, found, _, crc = RECORD.unpack(got)
            what = "empty" if got == bytes(SIZE) else f"magic {magic!r} device {dev} seq {found}"
            errors.append(f"slot {slot}: want record {seq} of device {device_id}, found {what}")
    return errors


def _newer(got: bytes, device_id: int, seq: int, slots: int) -> bool:
    """Whether ``got`` is a later record of the same device in seq's slot:
    the device writes on while the ring is read (its count read first)."""
    found = RECORD.unpack(got)[2]
    return found > seq and (found - seq) % slots == 0 and got == record(device_id, found)
