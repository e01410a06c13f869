"""The reference device served over vfio-user: each command of a client
connection mapped onto :class:`~.model.ReferenceDevice`.

Regions (PCI indices): BAR0 (4 KiB of registers), CONFIG (256 bytes), and,
for a v1 device, region 9: the migration region with a TYPE capability
(3, 1) and its data window offered for mmap by a SPARSE_MMAP capability.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import struct

from ..fsm import SAVING_GROUP
from ..states import MigState
from ..vfio_user import wire
from ..vfio_user.server import serve_unix
from ..vfio_user.wire import Feature, FeatureFlags as FF
from .model import BAR0_SIZE, DeviceError, ReferenceDevice
from .v1region import DATA_OFFSET, REGION_SIZE, REGION_SUBTYPE, REGION_TYPE, WINDOW, V1Region

log = logging.getLogger("qmpmig.device")

BAR0, CONFIG, MIGRATION_REGION = 0, 7, 9
NUM_IRQ_TYPES = 5
#: IRQ index -> (flags, count): INTx, MSI, MSI-X, ERR, REQ.
IRQS = {0: (wire.IrqInfoFlags.EVENTFD | wire.IrqInfoFlags.MASKABLE | wire.IrqInfoFlags.AUTOMASKED, 1),
        1: (wire.IrqInfoFlags.EVENTFD | wire.IrqInfoFlags.NORESIZE, 1),
        2: (wire.IrqInfoFlags.EVENTFD | wire.IrqInfoFlags.NORESIZE, 0),
        3: (wire.IrqInfoFlags.EVENTFD, 1),
        4: (wire.IrqInfoFlags.EVENTFD, 1)}
#: Feature -> the operations it has (vfio_check_feature's supported_ops).
FEATURE_OPS = {
    Feature.MIGRATION: FF.GET,
    Feature.MIG_DEVICE_STATE: FF.GET | FF.SET,
    Feature.DMA_LOGGING_START: FF.SET,
    Feature.DMA_LOGGING_STOP: FF.SET,
    Feature.DMA_LOGGING_REPORT: FF.GET,
    Feature.MIG_DATA_SIZE: FF.GET,
    Feature.QMPMIG_PRECOPY_INFO: FF.GET,
    Feature.QMPMIG_STATE_HASH: FF.GET,
}
V2_ONLY = {Feature.MIGRATION, Feature.MIG_DEVICE_STATE, Feature.MIG_DATA_SIZE, Feature.QMPMIG_PRECOPY_INFO}
PRECOPY = {MigState.PRE_COPY, MigState.PRE_COPY_P2P}


def _config_space(device_id: int) -> bytearray:
    """A type-0 header: vendor 0x1b36 (Red Hat, QEMU's), device 0x7f00 +
    id, class 0xff (unassigned), BAR0 a 4 KiB 32-bit MMIO BAR."""
    space = bytearray(256)
    struct.pack_into("<HH", space, 0, 0x1B36, 0x7F00 + (device_id & 0xFF))
    space[0x0B] = 0xFF
    struct.pack_into("<I", space, 0x10, 0)
    return space


class DeviceService:
    """vfio-user command handlers for one device, across client connections."""

    def __init__(self, device: ReferenceDevice):
        self.device = device
        self.v1 = V1Region(device) if device.config.migration == "v1" else None
        self.config_space = _config_space(device.config.device_id)
        self.irq_fds: dict[int, list[int]] = {}
        self.endpoint = None
        self._page_request_id = 0

    # -- connection ---------------------------------------------------------

    def attach(self, endpoint) -> None:
        self.endpoint = endpoint
        self.device.page_request = self._page_request

    def detach(self) -> None:
        """A client that leaves leaves the device as a fresh open finds it."""
        self.endpoint = None
        self.device.page_request = None
        self.device.disconnect()
        if self.v1:
            self.v1.data_size = None
        for fds in self.irq_fds.values():
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.irq_fds.clear()

    async def _page_request(self, iova: int) -> None:
        """Vendor extension: ask the client to make ``iova`` present, and
        wait until it says it is."""
        self._page_request_id = (self._page_request_id + 1) & 0xFFFFFFFF
        request = wire.PageRequest(self._page_request_id, iova, wire.PageRequestFlags.WRITE)
        await self.endpoint.request(wire.Command.QMPMIG_PAGE_REQUEST, request)

    # -- device -------------------------------------------------------------

    def on_device_get_info(self, msg):
        regions = MIGRATION_REGION + 1 if self.v1 else MIGRATION_REGION
        flags = wire.DeviceInfoFlags.RESET | wire.DeviceInfoFlags.PCI
        return wire.DeviceInfo(16, flags, regions, NUM_IRQ_TYPES)

    def on_device_get_region_info(self, msg):
        index, argsz = msg.payload.index, msg.payload.argsz
        rw = wire.RegionInfoFlags.READ | wire.RegionInfoFlags.WRITE
        if index == BAR0:
            return wire.RegionInfo(32, rw, index, 0, BAR0_SIZE, 0)
        if index == CONFIG:
            return wire.RegionInfo(32, rw, index, 0, len(self.config_space), 0)
        if index < MIGRATION_REGION:
            return wire.RegionInfo(32, 0, index, 0, 0, 0)
        if index == MIGRATION_REGION and self.v1:
            caps = (wire.TypeCap(REGION_TYPE, REGION_SUBTYPE), wire.SparseMmapCap(((DATA_OFFSET, WINDOW),)))
            info = wire.RegionInfo(0, rw | wire.RegionInfoFlags.MMAP, index, 0, REGION_SIZE, 0, caps)
            need = len(info._encode())
            if argsz < need:
                return wire.RegionInfo(need, rw | wire.RegionInfoFlags.MMAP, index, 0, REGION_SIZE, 0)
            return info, (self.v1.fd,)
        raise DeviceError(errno.EINVAL, f"no region {index}")

    def on_device_get_irq_info(self, msg):
        index = msg.payload.index
        if index not in IRQS:
            raise DeviceError(errno.EINVAL, f"no IRQ index {index}")
        flags, count = IRQS[index]
        return wire.IrqInfo(16, flags, index, count)

    def on_device_set_irqs(self, msg):
        req = msg.payload
        if req.index not in IRQS:
            raise DeviceError(errno.EINVAL, f"no IRQ index {req.index}")
        count = IRQS[req.index][1]
        if req.start + req.count > count or (req.count == 0 and req.start):
            raise DeviceError(errno.EINVAL, f"IRQs {req.start}+{req.count} of index {req.index} (has {count})")
        if req.flags & wire.IrqSetFlags.DATA_EVENTFD:
            for fd in self.irq_fds.pop(req.index, []):
                os.close(fd)
            if msg.fds:
                self.irq_fds[req.index] = list(msg.fds)
        return wire.Empty()

    def on_region_read(self, msg):
        req = msg.payload
        return wire.RegionAccess(req.offset, req.region, req.count, self._region_read(req))

    def _region_read(self, req) -> bytes:
        if req.region == BAR0:
            self._check_bounds(req, BAR0_SIZE)
            return self.device.mmio_read(req.offset, req.count)
        if req.region == CONFIG:
            self._check_bounds(req, len(self.config_space))
            return bytes(self.config_space[req.offset:req.offset + req.count])
        if req.region == MIGRATION_REGION and self.v1:
            return self.v1.read(req.offset, req.count)
        raise DeviceError(errno.EINVAL, f"region {req.region} cannot be read")

    def on_region_write(self, msg):
        req = msg.payload
        if req.region == BAR0:
            self._check_bounds(req, BAR0_SIZE)
            self.device.mmio_write(req.offset, req.data)
        elif req.region == CONFIG:
            self._check_bounds(req, len(self.config_space))
            if req.offset >= 0x04:
                self.config_space[req.offset:req.offset + req.count] = req.data
        elif req.region == MIGRATION_REGION and self.v1:
            self.v1.write(req.offset, req.data)
        else:
            raise DeviceError(errno.EINVAL, f"region {req.region} cannot be written")
        return wire.RegionAccess(req.offset, req.region, req.count)

    @staticmethod
    def _check_bounds(req, size: int) -> None:
        if req.offset + req.count > size:
            raise DeviceError(errno.EINVAL, f"{req.offset:#x}+{req.count} beyond region {req.region}")

    def on_device_reset(self, msg):
        self.device.reset()
        if self.v1:
            self.v1.data_size = None
        return wire.Empty()

    def on_dma_map(self, msg):
        req = msg.payload
        fd = msg.fds[0] if msg.fds else None
        self.device.dma.map(req.address, req.size, req.flags, fd, req.offset)
        return wire.Empty()

    def on_dma_unmap(self, msg):
        req = msg.payload
        self.device.dma.unmap(req.address, req.size)
        return req

    # -- DEVICE_FEATURE -----------------------------------------------------

    def on_device_feature(self, msg):
        req = msg.payload
        feature, ops = req.flags & FF.MASK, req.flags & (FF.GET | FF.SET | FF.PROBE)
        if ops & FF.GET and ops & FF.SET and not ops & FF.PROBE:
            raise DeviceError(errno.EINVAL, "GET and SET together without PROBE")
        if not ops & (FF.GET | FF.SET):
            raise DeviceError(errno.EINVAL, "neither GET nor SET")
        if feature not in FEATURE_OPS:
            raise DeviceError(errno.EINVAL, f"unknown feature {feature}")
        feature = Feature(feature)
        if self.v1 and feature in V2_ONLY:
            raise DeviceError(errno.ENOTTY, f"{feature.name}: this device migrates by the v1 region")
        wanted = ops & (FF.GET | FF.SET)
        if wanted & ~FEATURE_OPS[feature]:
            raise DeviceError(errno.EINVAL, f"{feature.name} has no such operation")
        if ops & FF.PROBE:
            return wire.DeviceFeature(req.argsz, req.flags)
        data = getattr(self, "_feature_" + feature.name.lower())(req.data)
        if ops & FF.SET:
            return wire.DeviceFeature(req.argsz, req.flags, req.data if data is None else data)
        if req.argsz < 8 + len(data):
            return wire.DeviceFeature(8 + len(data), req.flags)
        return wire.DeviceFeature(8 + len(data), req.flags, data)

    def _feature_migration(self, data: bytes) -> bytes:
        return wire.MigrationData(self.device.config.mig_flags).pack()

    def _feature_mig_device_state(self, data: bytes) -> bytes | None:
        if not data:
            return wire.MigDeviceStateData(self.device.device_state, -1).pack()
        self.device.set_v2(wire.MigDeviceStateData.unpack(data).device_state)
        return wire.MigDeviceStateData(self.device.device_state, -1).pack()

    def _feature_mig_data_size(self, data: bytes) -> bytes:
        saver = self.device.saver
        length = saver.pending_bytes if saver else self.device.state.size + 64 * 1024
        return wire.MigDataSizeData(length).pack()

    def _feature_qmpmig_precopy_info(self, data: bytes) -> bytes:
        if self.device.device_state not in PRECOPY:
            raise DeviceError(errno.EINVAL, "pre-copy info exists only in PRE_COPY and PRE_COPY_P2P")
        saver = self.device.saver
        return wire.PrecopyInfoData(saver.initial_bytes, saver.dirty_bytes).pack()

    def _feature_qmpmig_state_hash(self, data: bytes) -> bytes:
        return wire.StateHashData(self.device.state_hash()).pack()

    def _feature_dma_logging_start(self, data: bytes) -> bytes:
        control = wire.DmaLoggingControl.unpack(data)
        page_size = self.device.dma_log.start(control.page_size, list(control.ranges))
        return wire.DmaLoggingControl(page_size, control.ranges).pack()

    def _feature_dma_logging_stop(self, data: bytes) -> None:
        self.device.dma_log.stop()

    def _feature_dma_logging_report(self, data: bytes) -> bytes:
        report = wire.DmaLoggingReport.unpack(data)
        bitmap = self.device.dma_log.report(report.iova, report.length, report.page_size)
        return wire.DmaLoggingReport(report.iova, report.length, report.page_size, bitmap).pack()

    # -- v2 migration data --------------------------------------------------

    def on_mig_data_read(self, msg):
        if self.v1 or self.device.device_state not in SAVING_GROUP:
            raise DeviceError(errno.EINVAL, f"MIG_DATA_READ in {self.device.device_state.name}")
        data = self.device.saver.read(msg.payload.size)
        return wire.MigDataRead(8 + len(data), len(data), data)

    def on_mig_data_write(self, msg):
        if self.v1 or self.device.device_state is not MigState.RESUMING:
            raise DeviceError(errno.EINVAL, f"MIG_DATA_WRITE in {self.device.device_state.name}")
        try:
            self.device.loader.write(msg.payload.data)
        except ValueError as err:
            raise DeviceError(errno.EINVAL, f"migration data refused: {err}") from None
        return wire.Empty()


async def run(path: str, device: ReferenceDevice, ready: asyncio.Event | None = None) -> None:
    """Serve ``device`` on ``path`` with its engines running, until cancelled."""
    service = DeviceService(device)
    engines = asyncio.create_task(device.run_engines(), name="device engines")
    try:
        await serve_unix(path, service, ready=ready)
    finally:
        engines.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await engines
        if service.v1:
            service.v1.close()
