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
import zlib
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

    def page_data(self, pages: Iterable[int]) -> bytes:
        """The pages (by page number), one after the other."""
        return b"".join(self.mem[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] for p in pages)

    def write_pages(self, pages: list[int], data: bytes) -> None:
        """Write ``data`` (one page per number, in order) at those pages;
        ValueError, and nothing written, unless every page is in the RAM
        and ``data`` holds exactly them."""
        if len(data) != len(pages) * PAGE_SIZE:
            raise ValueError(f"{len(data)} bytes for {len(pages)} pages")
        if any(not 0 <= p < self.size // PAGE_SIZE for p in pages):
            raise ValueError(f"a page outside the guest's {self.size} bytes of RAM")
        for i, page in enumerate(pages):
            self.mem[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]

    def crcs(self, chunk: int = COMPARE_CHUNK) -> list[int]:
        """CRC-32 of each ``chunk`` bytes of the RAM, in order: what two
        hosts compare instead of the RAM itself."""
        view = memoryview(self.mem)
        try:
            return [zlib.crc32(view[off:off + chunk]) for off in range(0, self.size, chunk)]
        finally:
            view.release()

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
