"""Fixtures for end-to-end tests on real QEMU."""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

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


class FaultCell:
    """One cell of the fault matrix (docs/reliability.md): a test marks
    the moment its fault lands and says what came of it; with
    ``QMPMIG_FAULT_MATRIX=FILE`` set (scripts/fault-matrix sets it) each
    cell is appended there as a JSON line, from which the table is made."""

    def __init__(self, nodeid: str):
        self.nodeid = nodeid
        self.landed: float | None = None

    def fault(self) -> None:
        self.landed = time.monotonic()

    def outcome(self, fault: str, phase: str, guest_on: str, ended: float, message: str, **more) -> None:
        """Record the cell: where the guest runs, and seconds from the fault
        to the migration's end (recovered, the guest running on its side)."""
        out = os.environ.get("QMPMIG_FAULT_MATRIX")
        if not out:
            return
        row = {"fault": fault, "phase": phase, "guest_on": guest_on, "message": message, "test": self.nodeid,
               "recover_s": None if self.landed is None else round(ended - self.landed, 2), **more}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.fixture
def fault_cell(request):
    return FaultCell(request.node.nodeid)


def descendants(pid: int | None = None) -> list[str]:
    """The live (not zombie) processes under ``pid`` (this one by default),
    each as "pid command"."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if rest[0] != "Z":
            children.setdefault(int(rest[1]), []).append(int(entry))
            names[int(entry)] = name
    out, todo = [], list(children.get(pid or os.getpid(), ()))
    while todo:
        child = todo.pop()
        out.append(f"{child} {names[child]}")
        todo += children.get(child, ())
    return out


@pytest.fixture
def nothing_left_behind():
    """After the test: no process of its own left running, no rig directory
    of this process left in the temporary directory."""
    yield
    deadline = time.monotonic() + 10
    while (left := descendants()) and time.monotonic() < deadline:
        time.sleep(0.1)
    rigs = list(Path(tempfile.gettempdir()).glob(f"qmpmig-rig-{os.getpid()}-*"))
    assert not left and not rigs, f"left behind: processes {left}, directories {rigs}"
