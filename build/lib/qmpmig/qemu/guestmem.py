"""Guest RAM as a file: the ``memory-backend-file ... share=on`` QEMU maps.

The controller hands its fd to each device in DMA_MAP (SCM_RIGHTS passes
a copy: this one stays ours, closed once by :meth:`GuestRam.close`), and
copies the pages a device wrote by DMA from the source guest to the
destination guest (QEMU's RAM migration cannot see those writes).
Guest physical address = file offset, which holds for RAM below the PCI
hole (q35 puts up to 2 GiB of low memory at 0): qmpmig's test guests.
"""

from __future__ import annotations

import mmap
import os
from typing import Iterable

from ..vfio_user.uapi import PAGE_SIZE


class GuestRam:
    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.mem = mmap.mmap(self.fd, self.size)

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.mem[gpa:gpa + length])

    def copy_pages_to(self, other: "GuestRam", pages: Iterable[int]) -> int:
        """Copy each page (by page number) from this RAM into ``other``."""
        n = 0
        for page in sorted(set(pages)):
            off = page * PAGE_SIZE
            other.mem[off:off + PAGE_SIZE] = self.mem[off:off + PAGE_SIZE]
            n += 1
        return n

    def close(self) -> None:
        """Unmap and close; a second close does nothing."""
        if self.fd < 0:
            return
        self.mem.close()
        os.close(self.fd)
        self.fd = -1
