"""The harness never leaves a QEMU, a socket or a RAM file behind."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qmpmig.rig import vm
from qmpmig.rig.pair import Rig

pytestmark = pytest.mark.qemu
ROOT = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.split(") ", 1)[1][0] != "Z"


async def test_rig_teardown_after_a_failure_leaves_nothing(guest_image):
    with pytest.raises(RuntimeError, match="test failed here"):
        async with Rig() as rig:
            pids = [rig.src.proc.pid, rig.dst.proc.pid]
            files = [rig.src.ram_path, rig.dst.ram_path, rig.src.qmp_path, rig.dst.qmp_path]
            assert all(p.exists() for p in files)
            raise RuntimeError("test failed here")
    assert not any(alive(pid) for pid in pids)
    assert not any(p.exists() for p in files)
    assert not rig.workdir.exists()


def test_qemu_dies_with_the_process_that_started_it(guest_image, tmp_path):
    """SIGKILL the starter (no teardown runs): QEMU follows it, and the next
    start sweeps its RAM file."""
    script = ("import sys, time\n"
              "from qmpmig.rig.vm import Vm\n"
              "v = Vm('orphan', 'source', workdir=sys.argv[1]).start()\n"
              "print(v.proc.pid, v.ram_path, flush=True)\n"
              "time.sleep(600)\n")
    starter = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                               stdout=subprocess.PIPE, text=True, cwd=ROOT)
    pid, ram = starter.stdout.readline().split()
    assert alive(int(pid))
    starter.send_signal(signal.SIGKILL)
    starter.wait()
    deadline = time.monotonic() + 10
    while alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(int(pid))
    assert Path(ram) in vm.sweep_stale()
    assert not Path(ram).exists()


def test_guest_ram_is_a_shared_file_qemu_writes_through(guest_image):
    """The guest's memory is the /dev/shm file: the heartbeat loop's console
    line can be found in it, so a device process can DMA into it and the
    controller can copy it."""
    with vm.Vm("shared", "source", memory_mib=128) as v:
        v.start()
        beat = v.wait_heartbeat(2, 60)
        data = v.ram_path.read_bytes()
        assert len(data) == v.ram_size
        assert b"qmpmig-heartbeat" in data, beat


def test_under_tcg_before_qemu_9_the_ram_block_takes_the_page_at_a_time_dirty_sync():
    """QEMU before 9.0 loses stores under TCG when a RAM block is a multiple
    of 64 pages long (vm.TCG_RAM_PAD); the rig's guests are not."""
    tcg, kvm = vm.Vm("t", "source", accel="tcg", memory_mib=256), vm.Vm("k", "source", accel="kvm", memory_mib=256)
    assert kvm.ram_size == 256 << 20
    if vm.qemu_version() < (9, 0):
        assert tcg.ram_size % (64 * 4096) and tcg.ram_size % 8192 == 0
        assert f"size={tcg.ram_size >> 10}K," in " ".join(tcg.argv())
    else:
        assert tcg.ram_size == 256 << 20


def test_accel_override_and_fallback(monkeypatch):
    monkeypatch.setenv("QMPMIG_ACCEL", "tcg")
    assert vm.accel() == "tcg"
    monkeypatch.setenv("QMPMIG_ACCEL", "auto")
    monkeypatch.setattr(vm.os, "access", lambda *a: False)
    assert vm.accel() == "tcg"


def test_missing_image_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(vm, "IMAGE_DIR", tmp_path)
    with pytest.raises(vm.VmError, match="vm-images/build.sh"):
        vm.image()


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert ci in (ROOT / "README.md").read_text()


def test_launch_killed_leaves_nothing_after_the_next_sweep(guest_image):
    """``migrate --launch`` SIGKILLed: its QEMUs, device processes and
    daemon die with it, and the next start sweeps its RAM files and its work
    directory (sockets, consoles, the daemon's run directory)."""
    launcher = subprocess.Popen([sys.executable, "-m", "qmpmig", "migrate", "--launch", "--memory", "128"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = launcher.pid
    workdirs = lambda: list(Path(tempfile.gettempdir()).glob(f"qmpmig-rig-{pid}-*"))
    rams = lambda: list(Path("/dev/shm").glob(f"qmpmig-{pid}-*.ram"))
    deadline = time.monotonic() + 60
    while not (workdirs() and len(rams()) == 2 and list(workdirs()[0].glob("daemon/*.sock"))):
        assert time.monotonic() < deadline and launcher.poll() is None, "the launch never set up its rig"
        time.sleep(0.05)
    left = workdirs() + rams()
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while any(str(left[0]) in cmdline(p) for p in os.listdir("/proc") if p.isdigit()):
        assert time.monotonic() < deadline, "a process of the killed launch lives on"
        time.sleep(0.1)
    assert set(left) <= set(vm.sweep_stale())
    assert not any(path.exists() for path in left)


def cmdline(pid: str) -> str:
    """A live process's command line ('' once it is gone or a zombie)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace") if alive(int(pid)) else ""
    except (OSError, IndexError):
        return ""
