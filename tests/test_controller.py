"""The controller's pieces against real ``qmpmig-device`` processes and
guest RAM in a real shared-memory file, without QEMU: what a Side holds
for the VM's life must not grow with the requests it serves."""

import os
from pathlib import Path

import pytest

from qmpmig.controller.devices import RemoteDevice
from qmpmig.controller.side import Side
from qmpmig.controller.trace import Trace
from qmpmig.migration.states import MigState
from qmpmig.qemu.guestmem import GuestRam

MiB = 1 << 20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def guest_ram(tmp_path):
    path = Path("/dev/shm") / f"qmpmig-{os.getpid()}-{tmp_path.name}.ram"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    ram = GuestRam(path)
    yield ram
    ram.close()
    path.unlink()


async def test_dma_maps_do_not_leak_descriptors(spawn_device, guest_ram):
    """DMA_MAP passes the guest RAM fd by SCM_RIGHTS: the kernel gives the
    device a copy, the controller keeps one fd however often it maps."""
    procs = [spawn_device("--state-size", "1M") for _ in range(4)]
    devices = [await RemoteDevice.open(str(p.socket)) for p in procs]
    side = Side(None, guest_ram, timeout=10)
    try:
        for i, device in enumerate(devices):
            end = await side.add_device(f"dev{i}", device)
            assert end.state is MigState.RUNNING
        before = open_fds()
        for _ in range(25):
            for end in side.devices:
                await end.device.client.dma_unmap(0, guest_ram.size)
                await side.map_ram(end)
        assert open_fds() == before, "the controller's fd count grew with DMA maps"
    finally:
        for device in devices:
            await device.close()


async def test_guest_ram_closes_once(guest_ram):
    """A replaced destination's RAM is closed by the Side and again by its
    owner: the second close must not close a descriptor reused since."""
    guest_ram.close()
    reused = os.open("/dev/null", os.O_RDONLY)
    try:
        guest_ram.close()
        os.fstat(reused)
    finally:
        os.close(reused)
