"""Client memory as the device sees it: the DMA_MAP table, and the DMA
dirty log of VFIO_DEVICE_FEATURE_DMA_LOGGING_{START,STOP,REPORT}.

Mappings carry the client's memory fd (SCM_RIGHTS), mmap'd here, so a
device write lands in the client's pages (for a VM: in guest RAM).  Every
write through :meth:`DmaSpace.write` is logged while logging runs; REPORT
reads and clears (uAPI: "read and clear", bits only ever set).

The client keeps its fd and may shrink the file under the mapping
(issue 14, seed 003: a hostile client may spoil its own device's
migration, never kill the device).  A load or store past the end of a
shared file mapping is a SIGBUS, so the device never touches the mapping
itself: the kernel copies, by process_vm_writev/readv on this process,
and a page past the end of the file is EFAULT there.  That keeps the
mapping's own semantics (hugetlbfs, where write(2) is EINVAL, works; a
pwrite past the end would grow the file back instead of failing) and has
no check-then-write race.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
from dataclasses import dataclass

from ..errors import DeviceError
from ..vfio_user.codec import LOG_MAX_RANGES
from ..vfio_user.uapi import PAGE_SIZE, DmaFlags, bitmap_set, dirty_bitmap_size


#: The most mappings a client may hold at once (vfio-user spec, VERSION
#: capability ``max_dma_maps``, which the device offers); each holds an fd.
MAX_DMA_MAPS = 1024


class _Iovec(ctypes.Structure):
    """struct iovec (<sys/uio.h>); ``base`` takes bytes or an address."""

    _fields_ = [("base", ctypes.c_char_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_process_vm_writev, _process_vm_readv = _libc.process_vm_writev, _libc.process_vm_readv
for _call in (_process_vm_writev, _process_vm_readv):
    _call.restype = ctypes.c_ssize_t
    _call.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
_mmap, _munmap = _libc.mmap, _libc.munmap
_mmap.restype, _mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                                  ctypes.c_int, ctypes.c_long]
_munmap.restype, _munmap.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]
#: mmap(2)'s MAP_FAILED, (void *) -1.
_MAP_FAILED = ctypes.c_void_p(-1).value
#: The two iovecs of every copy, made once (a copy is a few microseconds;
#: building them each time doubled it).  The device is single-threaded.
_LOCAL, _REMOTE = _Iovec(), _Iovec()
_LOCAL_AT, _REMOTE_AT = ctypes.addressof(_LOCAL), ctypes.addressof(_REMOTE)


def _kernel_copy(call, local: bytes | int, remote: int, length: int) -> None:
    """Copy ``length`` bytes between ``local`` (bytes, or an address) and
    the address ``remote`` of this process, by process_vm_writev (local to
    remote) or _readv (remote to local): OSError(EFAULT) instead of SIGBUS
    where a page is gone."""
    _LOCAL.base, _LOCAL.len, _REMOTE.base, _REMOTE.len = local, length, remote, length
    try:
        done = call(os.getpid(), _LOCAL_AT, 1, _REMOTE_AT, 1, 0)
    finally:
        _LOCAL.base = None
    if done < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if done != length:
        raise OSError(errno.EFAULT, f"{length - done} of {length} bytes past the end of the file")


@dataclass
class Mapping:
    address: int
    size: int
    flags: int
    fd: int
    offset: int
    #: Where the mapping of ``fd`` starts in this process (0: no fd, no mapping;
    #: by libc's mmap, for a read-only mapping has no writable buffer to
    #: take the address of).
    base: int = 0

    @property
    def end(self) -> int:
        return self.address + self.size


class DmaLog:
    """Dirty pages of device writes, tracked at PAGE_SIZE granularity."""

    def __init__(self):
        self.ranges: list[tuple[int, int]] | None = None
        self.page_size = PAGE_SIZE
        self._dirty: set[int] = set()

    @property
    def running(self) -> bool:
        return self.ranges is not None

    def start(self, page_size: int, ranges: list[tuple[int, int]]) -> int:
        """Start logging; return the page size chosen (uAPI: a hint)."""
        if self.running:
            raise DeviceError(errno.EBUSY, "DMA logging already started")
        if not ranges:
            raise DeviceError(errno.EINVAL, "no ranges")
        if len(ranges) > LOG_MAX_RANGES:
            raise DeviceError(errno.E2BIG, f"more than {LOG_MAX_RANGES} ranges")
        if page_size < PAGE_SIZE or page_size & (page_size - 1):
            page_size = PAGE_SIZE
        spans = sorted(ranges)
        for iova, length in spans:
            if iova % page_size or length % page_size or not length:
                raise DeviceError(errno.EINVAL, f"range {iova:#x}+{length:#x} not {page_size}-aligned")
            if iova + length > 1 << 64:
                raise DeviceError(errno.EOVERFLOW, f"range {iova:#x}+{length:#x} overflows")
        for (a, la), (b, _) in zip(spans, spans[1:]):
            if a + la > b:
                raise DeviceError(errno.EINVAL, "ranges overlap")
        self.ranges, self.page_size, self._dirty = spans, page_size, set()
        return page_size

    def stop(self) -> None:
        self.ranges = None
        self._dirty = set()

    def mark(self, iova: int, length: int) -> None:
        if not self.running or not length:
            return
        for page in range(iova // PAGE_SIZE, (iova + length - 1) // PAGE_SIZE + 1):
            addr = page * PAGE_SIZE
            if any(a <= addr < a + n for a, n in self.ranges):
                self._dirty.add(page)

    def report(self, iova: int, length: int, page_size: int, max_bytes: int) -> bytes:
        """The bitmap of [iova, iova+length) at ``page_size``: bit n (word
        n // 64, bit n % 64) for the page at iova + n * page_size.  Clears
        what it reports.  A bitmap longer than ``max_bytes`` (what one reply
        carries) is E2BIG before anything is allocated: its size is the
        client's to choose (issue 14)."""
        if not self.running:
            raise DeviceError(errno.EINVAL, "DMA logging is not started")
        if page_size < PAGE_SIZE or page_size & (page_size - 1):
            raise DeviceError(errno.EINVAL, f"page size {page_size} is not a power of two >= {PAGE_SIZE}")
        if iova + length > 1 << 64:
            raise DeviceError(errno.EOVERFLOW, "range overflows")
        size = dirty_bitmap_size(length, page_size)
        if size > max_bytes:
            raise DeviceError(errno.E2BIG, f"a bitmap of {size} bytes, more than the {max_bytes} a reply carries")
        bitmap = bytearray(size)
        first, last = iova // PAGE_SIZE, (iova + length - 1) // PAGE_SIZE
        hits = [p for p in self._dirty if first <= p <= last]
        for page in hits:
            n = (page * PAGE_SIZE - iova) // page_size if page * PAGE_SIZE >= iova else 0
            bitmap_set(bitmap, n)
            self._dirty.discard(page)
        return bytes(bitmap)


class DmaSpace:
    """The DMA_MAP table of one client connection."""

    def __init__(self, log: DmaLog):
        self.maps: list[Mapping] = []
        self.log = log

    def map(self, address: int, size: int, flags: int, fd: int | None, offset: int) -> None:
        try:
            self._check(address, size, fd, offset)
        except DeviceError:
            if fd is not None:
                os.close(fd)
            raise
        base = 0
        if fd is not None:
            prot = (mmap.PROT_READ if flags & DmaFlags.READ else 0) | (mmap.PROT_WRITE if flags & DmaFlags.WRITE else 0)
            base = _mmap(None, size, prot or mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
            if base == _MAP_FAILED:
                err = ctypes.get_errno()
                os.close(fd)
                raise DeviceError(errno.EINVAL, f"cannot map the fd: {os.strerror(err)}")
        self.maps.append(Mapping(address, size, flags, -1 if fd is None else fd, offset, base))

    def _check(self, address: int, size: int, fd: int | None, offset: int) -> None:
        """A mapping of some size, overlapping none, within max_dma_maps and
        within its file (a shrink afterwards is EFAULT at the DMA: above)."""
        if not size:
            raise DeviceError(errno.EINVAL, "zero-sized mapping")
        if offset + size > 1 << 63:
            raise DeviceError(errno.EINVAL, f"offset {offset:#x}+{size:#x} beyond any file (off_t)")
        if len(self.maps) >= MAX_DMA_MAPS:
            raise DeviceError(errno.ENOSPC, f"{MAX_DMA_MAPS} mappings already (max_dma_maps)")
        for m in self.maps:
            if address < m.end and m.address < address + size:
                raise DeviceError(errno.EEXIST, f"{address:#x}+{size:#x} overlaps {m.address:#x}+{m.size:#x}")
        if fd is not None:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode) and offset + size > info.st_size:
                raise DeviceError(errno.EINVAL, f"{address:#x}+{size:#x} at offset {offset:#x} goes past the end "
                                                f"of its file ({info.st_size:#x} bytes)")

    def unmap(self, address: int, size: int) -> None:
        for m in self.maps:
            if (m.address, m.size) == (address, size):
                self._release(m)
                self.maps.remove(m)
                return
        raise DeviceError(errno.EINVAL, f"no mapping is exactly {address:#x}+{size:#x}")

    def clear(self) -> None:
        for m in self.maps:
            self._release(m)
        self.maps.clear()

    @staticmethod
    def _release(m: Mapping) -> None:
        if m.base:
            _munmap(m.base, m.size)
        if m.fd >= 0:
            os.close(m.fd)

    def _find(self, iova: int, length: int, flag: int) -> tuple[Mapping, int]:
        for m in self.maps:
            if m.address <= iova and iova + length <= m.end:
                if not m.base or not m.flags & flag:
                    raise DeviceError(errno.EPERM, f"{iova:#x}+{length:#x} is not mapped for this access")
                return m, iova - m.address
        raise DeviceError(errno.EFAULT, f"{iova:#x}+{length:#x} is not mapped")

    def write(self, iova: int, data: bytes) -> None:
        """DMA ``data`` to ``iova``; OSError (EFAULT where the client shrank
        the file) and nothing logged if it does not all land."""
        m, off = self._find(iova, len(data), DmaFlags.WRITE)
        if data:
            _kernel_copy(_process_vm_writev, bytes(data), m.base + off, len(data))
        self.log.mark(iova, len(data))

    def read(self, iova: int, length: int) -> bytes:
        """``length`` bytes DMA'd from ``iova``; OSError as :meth:`write`."""
        m, off = self._find(iova, length, DmaFlags.READ)
        buf = ctypes.create_string_buffer(length)
        if length:
            _kernel_copy(_process_vm_readv, ctypes.addressof(buf), m.base + off, length)
        return buf.raw
