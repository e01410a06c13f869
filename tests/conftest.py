"""Fixtures for end-to-end tests on real QEMU."""

import shutil

import pytest

from qmpmig import vm
from qmpmig.rig import Rig


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
