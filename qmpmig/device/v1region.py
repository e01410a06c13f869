"""The v1 migration region: ``struct vfio_device_migration_info`` at offset
0, the data window after it (VFIO_REGION_TYPE_MIGRATION 3, subtype 1).

Iteration, as seed 001 and the v1 header have it: ``pending_bytes`` may be
polled freely; the first read of ``data_offset`` starts an iteration and
prepares data; ``data_offset`` and ``data_size`` do not change within it;
the next ``pending_bytes`` read ends it (the buffer was consumed).
Resuming: the user writes a chunk at ``data_offset`` and commits it by
writing its length to ``data_size``.  Fields are accessed only at their
own width and alignment; anything else is EINVAL.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

from ..errors import DeviceError
from ..migration.states import V1, V1_ERROR
from ..vfio_user.uapi import MIGRATION_INFO, PAGE_SIZE, field_at
from .model import ReferenceDevice

#: The data window: one page after struct vfio_device_migration_info.
DATA_OFFSET = PAGE_SIZE
WINDOW = 1 << 20
REGION_SIZE = DATA_OFFSET + WINDOW


class V1Region:
    """Region accesses for one device; the window is a memfd the client may mmap."""

    def __init__(self, device: ReferenceDevice):
        self.device = device
        # The fd stands for the whole region: the window sits at its region
        # offset, so the client maps SPARSE_MMAP areas at region offset + area.
        # Sealed at its size: the client holds the fd, and a shrink would
        # make the device's next access to its window a SIGBUS (seed 003).
        self.fd = os.memfd_create("qmpmig-v1-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, REGION_SIZE)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        self.window = mmap.mmap(self.fd, WINDOW, offset=DATA_OFFSET)
        self.data_size: int | None = None
        self._reads = 0
        #: struct vfio_device_migration_info: field -> read, and field -> write
        #: (a field without a write is read-only).
        self._read = {"device_state": self._read_device_state, "reserved": lambda: 0,
                      "pending_bytes": self._read_pending_bytes, "data_offset": self._read_data_offset,
                      "data_size": self._read_data_size}
        self._write = {"device_state": self._write_device_state, "reserved": lambda value: None,
                       "data_size": self._write_data_size}

    def close(self) -> None:
        self.window.close()
        os.close(self.fd)

    @property
    def saving(self) -> bool:
        return bool(self.device.bits & V1.SAVING) and self.device.saver is not None and not self.device.error

    @property
    def resuming(self) -> bool:
        return bool(self.device.bits & V1.RESUMING) and self.device.loader is not None

    @staticmethod
    def _field(offset: int, count: int) -> str:
        name = field_at(MIGRATION_INFO, offset, count)
        if name is None:
            raise DeviceError(errno.EINVAL, f"migration region access {offset:#x}+{count} is not a field")
        return name

    def read(self, offset: int, count: int) -> bytes:
        if offset >= DATA_OFFSET:
            return self._window_slice(offset, count, bytes)
        name = self._field(offset, count)
        return MIGRATION_INFO[name].pack(self._read[name]())

    def write(self, offset: int, data: bytes) -> None:
        if offset >= DATA_OFFSET:
            start = self._window_slice(offset, len(data), None)
            self.window[start:start + len(data)] = data
            return
        name = self._field(offset, len(data))
        if name not in self._write:
            raise DeviceError(errno.EINVAL, f"{name} is read-only")
        self._write[name](MIGRATION_INFO[name].unpack(data))

    def _window_slice(self, offset: int, count: int, kind):
        start = offset - DATA_OFFSET
        if start + count > WINDOW:
            raise DeviceError(errno.EINVAL, f"{offset:#x}+{count} is outside the region")
        return bytes(self.window[start:start + count]) if kind is bytes else start

    def _read_device_state(self) -> int:
        return V1_ERROR if self.device.error else self.device.bits

    def _write_device_state(self, value: int) -> None:
        self.data_size = None
        self.device.set_v1(value)

    def _read_pending_bytes(self) -> int:
        """Ends an iteration if one is open; otherwise a free poll."""
        self.data_size = None
        return self.device.saver.pending_bytes if self.saving else 0

    def _read_data_offset(self) -> int:
        if self.resuming:
            return DATA_OFFSET
        if not self.saving:
            raise DeviceError(errno.EINVAL, "data_offset outside SAVING and RESUMING")
        if self.data_size is None:
            data = self.device.saver.read(WINDOW)
            self.window[:len(data)] = data
            self.data_size, self._reads = len(data), 0
        return DATA_OFFSET

    def _read_data_size(self) -> int:
        if self.resuming:
            return 0
        if self.data_size is None:
            raise DeviceError(errno.EINVAL, "data_size read outside an iteration")
        self._reads += 1
        if "data-size-changes" in self.device.config.defects and self._reads > 1:
            return max(0, self.data_size - self._reads + 1)
        return self.data_size

    def _write_data_size(self, value: int) -> None:
        if not self.resuming:
            raise DeviceError(errno.EINVAL, "data_size is written only in RESUMING")
        if value > WINDOW:
            raise DeviceError(errno.EINVAL, f"data_size {value} exceeds the window")
        self.device.loader.write(bytes(self.window[:value]))
