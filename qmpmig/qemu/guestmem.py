"""Guest RAM as a file: the ``memory-backend-file ... share=on`` QEMU maps.

The controller hands its fd to each device in DMA_MAP (SCM_RIGHTS passes
a copy: this one stays ours, closed once by :meth:`GuestRam.close`), and
copies the pages a device wrote by DMA from the source guest to the
destination guest (QEMU's RAM migration cannot see those writes).
Guest physical address = file offset, which holds for RAM below the PCI
hole (q35 puts up to 2 GiB of low memory at 0): qmpmig's test guests.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Iterable

from ..vfio_user.uapi import PAGE_SIZE

_libc = ctypes.CDLL(None)
_memcmp = _libc.memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
#: Bytes compared at once before a difference is narrowed to its pages.
COMPARE_CHUNK = 1 << 20


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

    def differing_pages(self, other: "GuestRam") -> list[int]:
        """Page numbers whose bytes differ between this RAM and ``other``
        (memcmp a MiB at a time, then page by page where a MiB differs)."""
        if other.size != self.size:
            raise ValueError(f"guest RAM sizes differ: {self.size} and {other.size} bytes")
        mine, theirs = ctypes.c_char.from_buffer(self.mem), ctypes.c_char.from_buffer(other.mem)
        try:
            a, b = ctypes.addressof(mine), ctypes.addressof(theirs)
            pages = []
            for off in range(0, self.size, COMPARE_CHUNK):
                n = min(COMPARE_CHUNK, self.size - off)
                if _memcmp(a + off, b + off, n):
                    pages += [p // PAGE_SIZE for p in range(off, off + n, PAGE_SIZE)
                              if _memcmp(a + p, b + p, PAGE_SIZE)]
            return pages
        finally:
            del mine, theirs     # the exports end here, so that close() may unmap

    def close(self) -> None:
        """Unmap and close; a second close does nothing."""
        if self.fd < 0:
            return
        self.mem.close()
        os.close(self.fd)
        self.fd = -1
