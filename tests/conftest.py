"""Fixtures for end-to-end tests on real QEMU."""

import shutil

import pytest

from qmpmig.rig import vm
from qmpmig.rig.pair import Rig


@pytest.fixture(scope="session")
def guest_image():
    """QEMU and the guest image are installed by scripts/setup.sh: their
    absence fails the test rather than skipping it."""
    if shutil.which(vm.QEMU) is None:
        pytest.fail(f"{vm.QEMU} not found: run scripts/setup.sh")
    return vm.image()


@pytest.fixture
async def rig(guest_image):
    async with Rig() as r:
        yield r


@pytest.fixture
def spawn_device(tmp_path):
    """Start real ``qmpmig-device`` processes; all are stopped at teardown."""
    from qmpmig.rig.processes import DeviceProcess

    started = []

    def spawn(*options: str, name: str | None = None) -> DeviceProcess:
        name = name or f"dev{len(started)}"
        proc = DeviceProcess(tmp_path / f"{name}.sock", *options)
        started.append(proc)
        return proc.start()

    yield spawn
    for proc in started:
        proc.close()
