"""Guest RAM as a file: the ``memory-backend-file ... share=on`` QEMU maps.

The controller reads and writes it directly, to hand its fd to a device in
DMA_MAP and to copy the pages a device wrote by DMA from the source guest
to the destination guest (QEMU's RAM migration cannot see those writes).
Guest physical address = file offset, which holds for RAM below the PCI
hole (q35 puts up to 2 GiB of low memory at 0): qmpmig's test guests.
"""

from __future__ import annotations

import mmap
import os
from typing import Iterable

PAGE = 4096


class GuestRam:
    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.mem = mmap.mmap(self.fd, self.size)

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.mem[gpa:gpa + length])

    def dup_fd(self) -> int:
        """A descriptor to pass in DMA_MAP (the transport sends it, we keep ours)."""
        return os.dup(self.fd)

    def copy_pages_to(self, other: "GuestRam", pages: Iterable[int]) -> int:
        """Copy each page (by page number) from this RAM into ``other``."""
        n = 0
        for page in sorted(set(pages)):
            off = page * PAGE
            other.mem[off:off + PAGE] = self.mem[off:off + PAGE]
            n += 1
        return n

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)
