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

from ..errors import DeviceError
from ..migration.fsm import SAVING_GROUP
from ..migration.states import MigState
from ..vfio_user import codec
from ..vfio_user.codec import Command
from ..vfio_user.server import serve_unix
from ..vfio_user.uapi import (MIGRATION_REGION_TYPE, PCI_NUM_IRQS, PCI_NUM_REGIONS, DeviceInfoFlags, Feature,
                              FeatureFlags as FF, IrqInfoFlags, IrqSetFlags, PciIrq, PciRegion, RegionInfoFlags)
from .bar0 import BAR0_SIZE, PCI_DEVICE, PCI_VENDOR
from .dma import MAX_DMA_MAPS
from .model import ReferenceDevice
from .v1region import DATA_OFFSET, REGION_SIZE, WINDOW, V1Region

log = logging.getLogger("qmpmig.device")

BAR0, CONFIG = PciRegion.BAR0, PciRegion.CONFIG
#: A v1 device's migration region: the first device-specific index.
MIGRATION_REGION = PCI_NUM_REGIONS
#: IRQ index -> (flags, count).
IRQS = {PciIrq.INTX: (IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED, 1),
        PciIrq.MSI: (IrqInfoFlags.EVENTFD | IrqInfoFlags.NORESIZE, 1),
        PciIrq.MSIX: (IrqInfoFlags.EVENTFD | IrqInfoFlags.NORESIZE, 0),
        PciIrq.ERR: (IrqInfoFlags.EVENTFD, 1),
        PciIrq.REQ: (IrqInfoFlags.EVENTFD, 1)}
#: Features whose GET reads its buffer: the range of a DMA_LOGGING_REPORT.
GET_TAKES_INPUT = {Feature.DMA_LOGGING_REPORT}
V2_ONLY = {Feature.MIGRATION, Feature.MIG_DEVICE_STATE, Feature.MIG_DATA_SIZE, Feature.QMPMIG_PRECOPY_INFO}
PRECOPY = {MigState.PRE_COPY, MigState.PRE_COPY_P2P}


def _config_space(device_id: int) -> bytearray:
    """A type-0 header: vendor 0x1b36 (Red Hat, QEMU's), device 0x7f00 +
    id, class 0xff (unassigned), BAR0 a 4 KiB 32-bit MMIO BAR."""
    space = bytearray(256)
    struct.pack_into("<HH", space, 0, PCI_VENDOR, PCI_DEVICE + (device_id & 0xFF))
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
        #: vfio-user command -> its handler (the server's dispatch table).
        self.commands = {
            Command.DEVICE_GET_INFO: self.device_get_info,
            Command.DEVICE_GET_REGION_INFO: self.device_get_region_info,
            Command.DEVICE_GET_IRQ_INFO: self.device_get_irq_info,
            Command.DEVICE_SET_IRQS: self.device_set_irqs,
            Command.REGION_READ: self.region_read,
            Command.REGION_WRITE: self.region_write,
            Command.DEVICE_RESET: self.device_reset,
            Command.DMA_MAP: self.dma_map,
            Command.DMA_UNMAP: self.dma_unmap,
            Command.DEVICE_FEATURE: self.device_feature,
            Command.MIG_DATA_READ: self.mig_data_read,
            Command.MIG_DATA_WRITE: self.mig_data_write,
        }
        #: DEVICE_FEATURE index -> (the operations it has, as
        #: vfio_check_feature's supported_ops, and its handler of the data).
        self.features = {
            Feature.MIGRATION: (FF.GET, self.feature_migration),
            Feature.MIG_DEVICE_STATE: (FF.GET | FF.SET, self.feature_mig_device_state),
            Feature.DMA_LOGGING_START: (FF.SET, self.feature_dma_logging_start),
            Feature.DMA_LOGGING_STOP: (FF.SET, self.feature_dma_logging_stop),
            Feature.DMA_LOGGING_REPORT: (FF.GET, self.feature_dma_logging_report),
            Feature.MIG_DATA_SIZE: (FF.GET, self.feature_mig_data_size),
            Feature.QMPMIG_PRECOPY_INFO: (FF.GET, self.feature_precopy_info),
            Feature.QMPMIG_STATE_HASH: (FF.GET, self.feature_state_hash),
        }

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
        request = codec.PageRequest(self._page_request_id, iova, codec.PageRequestFlags.WRITE)
        await self.endpoint.request(codec.Command.QMPMIG_PAGE_REQUEST, request)

    # -- device -------------------------------------------------------------

    def device_get_info(self, msg):
        regions = MIGRATION_REGION + 1 if self.v1 else MIGRATION_REGION
        return codec.DeviceInfo.sized(DeviceInfoFlags.RESET | DeviceInfoFlags.PCI, regions, PCI_NUM_IRQS)

    def device_get_region_info(self, msg):
        index, argsz = msg.payload.index, msg.payload.argsz
        rw = RegionInfoFlags.READ | RegionInfoFlags.WRITE
        if index == BAR0:
            return codec.RegionInfo.sized(rw, index, 0, BAR0_SIZE, 0)
        if index == CONFIG:
            return codec.RegionInfo.sized(rw, index, 0, len(self.config_space), 0)
        if index < MIGRATION_REGION:
            return codec.RegionInfo.sized(0, index, 0, 0, 0)
        if index == MIGRATION_REGION and self.v1:
            caps = (codec.TypeCap(*MIGRATION_REGION_TYPE), codec.SparseMmapCap(((DATA_OFFSET, WINDOW),)))
            info = codec.RegionInfo.sized(rw | RegionInfoFlags.MMAP, index, 0, REGION_SIZE, 0, caps)
            if argsz < info.argsz:
                # As the kernel answers: the argsz needed, CAPS set, no chain.
                return codec.RegionInfo(info.argsz, info.flags | RegionInfoFlags.CAPS, index, 0, REGION_SIZE, 0)
            return info, (self.v1.fd,)
        raise DeviceError(errno.EINVAL, f"no region {index}")

    def device_get_irq_info(self, msg):
        index = msg.payload.index
        if index not in IRQS:
            raise DeviceError(errno.EINVAL, f"no IRQ index {index}")
        flags, count = IRQS[index]
        return codec.IrqInfo.sized(flags, index, count)

    def device_set_irqs(self, msg):
        req = msg.payload
        if req.index not in IRQS:
            raise DeviceError(errno.EINVAL, f"no IRQ index {req.index}")
        count = IRQS[req.index][1]
        if req.start + req.count > count or (req.count == 0 and req.start):
            raise DeviceError(errno.EINVAL, f"IRQs {req.start}+{req.count} of index {req.index} (has {count})")
        if req.flags & IrqSetFlags.DATA_EVENTFD:
            for fd in self.irq_fds.pop(req.index, []):
                os.close(fd)
            if msg.fds:
                self.irq_fds[req.index] = list(msg.fds)
        return codec.Empty()

    def region_read(self, msg):
        req = msg.payload
        return codec.RegionAccess(req.offset, req.region, req.count, self._region_read(req))

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

    def region_write(self, msg):
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
        return codec.RegionAccess(req.offset, req.region, req.count)

    @staticmethod
    def _check_bounds(req, size: int) -> None:
        if req.offset + req.count > size:
            raise DeviceError(errno.EINVAL, f"{req.offset:#x}+{req.count} beyond region {req.region}")

    def device_reset(self, msg):
        self.device.reset()
        if self.v1:
            self.v1.data_size = None
        return codec.Empty()

    def dma_map(self, msg):
        req = msg.payload
        fd = msg.fds[0] if msg.fds else None
        self.device.dma.map(req.address, req.size, req.flags, fd, req.offset)
        return codec.Empty()

    def dma_unmap(self, msg):
        req = msg.payload
        self.device.dma.unmap(req.address, req.size)
        return req

    # -- DEVICE_FEATURE -----------------------------------------------------

    def device_feature(self, msg):
        req = msg.payload
        feature, ops = req.flags & FF.MASK, req.flags & (FF.GET | FF.SET | FF.PROBE)
        if ops & FF.GET and ops & FF.SET and not ops & FF.PROBE:
            raise DeviceError(errno.EINVAL, "GET and SET together without PROBE")
        if not ops & (FF.GET | FF.SET):
            raise DeviceError(errno.EINVAL, "neither GET nor SET")
        if feature not in self.features:
            raise DeviceError(errno.EINVAL, f"unknown feature {feature}")
        feature = Feature(feature)
        if self.v1 and feature in V2_ONLY:
            raise DeviceError(errno.ENOTTY, f"{feature.name}: this device migrates by the v1 region")
        supported, handle = self.features[feature]
        if ops & (FF.GET | FF.SET) & ~supported:
            raise DeviceError(errno.EINVAL, f"{feature.name} has no such operation")
        if ops & FF.PROBE:
            return codec.DeviceFeature(req.argsz, req.flags)
        # A GET's buffer is room for the answer (the kernel ioctl and other
        # clients send it), except where the GET takes input.
        data = handle(req.data if ops & FF.SET or feature in GET_TAKES_INPUT else b"")
        if ops & FF.SET:
            return codec.DeviceFeature(req.argsz, req.flags, req.data if data is None else data)
        reply = codec.DeviceFeature.sized(req.flags, data)
        if req.argsz < reply.argsz:
            return codec.DeviceFeature(reply.argsz, req.flags)
        return reply

    def feature_migration(self, data: bytes) -> bytes:
        return codec.MigrationData(self.device.config.mig_flags).pack()

    def feature_mig_device_state(self, data: bytes) -> bytes | None:
        if not data:
            return codec.MigDeviceStateData(self.device.device_state, -1).pack()
        self.device.set_v2(codec.MigDeviceStateData.unpack(data).device_state)
        return codec.MigDeviceStateData(self.device.device_state, -1).pack()

    def feature_mig_data_size(self, data: bytes) -> bytes:
        saver = self.device.saver
        length = saver.pending_bytes if saver else self.device.state.size + 64 * 1024
        return codec.MigDataSizeData(length).pack()

    def feature_precopy_info(self, data: bytes) -> bytes:
        if self.device.device_state not in PRECOPY:
            raise DeviceError(errno.EINVAL, "pre-copy info exists only in PRE_COPY and PRE_COPY_P2P")
        saver = self.device.saver
        return codec.PrecopyInfoData(saver.initial_bytes, saver.dirty_bytes).pack()

    def feature_state_hash(self, data: bytes) -> bytes:
        return codec.StateHashData(self.device.state_hash()).pack()

    def feature_dma_logging_start(self, data: bytes) -> bytes:
        control = codec.DmaLoggingControl.unpack(data)
        page_size = self.device.dma_log.start(control.page_size, list(control.ranges))
        return codec.DmaLoggingControl(page_size, control.ranges).pack()

    def feature_dma_logging_stop(self, data: bytes) -> None:
        self.device.dma_log.stop()

    def feature_dma_logging_report(self, data: bytes) -> bytes:
        report = codec.DmaLoggingReport.unpack(data)
        limit = self.endpoint.conn.max_data_xfer_size if self.endpoint else codec.DEFAULT_MAX_DATA_XFER
        bitmap = self.device.dma_log.report(report.iova, report.length, report.page_size, limit)
        return codec.DmaLoggingReport(report.iova, report.length, report.page_size, bitmap).pack()

    # -- v2 migration data --------------------------------------------------

    def mig_data_read(self, msg):
        if self.v1 or self.device.device_state not in SAVING_GROUP:
            raise DeviceError(errno.EINVAL, f"MIG_DATA_READ in {self.device.device_state.name}")
        data = self.device.saver.read(msg.payload.size)
        if ("cut-data-reply" in self.device.config.defects and len(data) >= 1 << 20
                and self.device.device_state is MigState.STOP_COPY):
            self.endpoint.cut_next_reply = len(data) // 2
        return codec.MigDataRead.sized(len(data), data)

    def mig_data_write(self, msg):
        if self.v1 or self.device.device_state is not MigState.RESUMING:
            raise DeviceError(errno.EINVAL, f"MIG_DATA_WRITE in {self.device.device_state.name}")
        self.device.loader.write(msg.payload.data)
        return codec.Empty()


#: What the device offers in VERSION; max_dma_maps is what DMA_MAP enforces.
CAPABILITIES = {"max_msg_fds": 8, "max_data_xfer_size": codec.QMPMIG_MAX_DATA_XFER, "max_dma_maps": MAX_DMA_MAPS}


async def run(path: str, device: ReferenceDevice, ready: asyncio.Event | None = None,
              allowed_uids: frozenset[int] = frozenset()) -> None:
    """Serve ``device`` on ``path`` with its engines running, until cancelled."""
    service = DeviceService(device)
    engines = asyncio.create_task(device.run_engines(), name="device engines")
    try:
        await serve_unix(path, service, CAPABILITIES, ready=ready, allowed_uids=allowed_uids)
    finally:
        engines.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await engines
        if service.v1:
            service.v1.close()
