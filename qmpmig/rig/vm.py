"""QEMU processes for qmpmig's own rigs: the test guest, started and torn down.

A :class:`Vm` is one ``qemu-system-x86_64`` with its guest RAM in a shared
memory file (``memory-backend-file ... share=on``, so a device process can
DMA into it and the controller can copy it), a QMP socket and the serial
console in a file.  A destination waits with ``-incoming defer -S``.  QEMU
dies with the process that started it (PR_SET_PDEATHSIG), and
:meth:`Vm.close` removes every file it made, so a failing test leaves
nothing behind.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..errors import VmError
from ..migration.lifecycle import Role
from .processes import die_with_parent, stop_process

ROOT = Path(__file__).resolve().parents[2]
IMAGE_DIR = Path(os.environ.get("QMPMIG_IMAGE_DIR", ROOT / "vm-images" / "build"))
QEMU = os.environ.get("QMPMIG_QEMU", "qemu-system-x86_64")
#: The kernel command line of the test guest (vm-images/README.md).
GUEST_APPEND = "console=ttyS0 quiet panic=-1 nokaslr"
#: Guest RAM kept from the guest kernel (memmap=size$base): the window where
#: device processes DMA, as a driver's buffers would be.  Low in RAM, where
#: QEMU's first RAM pass comes early, so that device writes after QEMU sent a
#: page are certain (the DMA-dirty copy must be seen to matter).  2 MiB up
#: only held the compressed kernel during boot.
DMA_WINDOW = (2 << 20, 12 << 20)
#: QEMU before 9.0 loses guest stores during a migration under TCG: for a
#: RAM block whose length is a multiple of 64 pages, its dirty-bitmap sync
#: clears 64 bits at a time without making the TCG TLB catch the next store
#: to those pages, so a store made after a page was sent may never be sent
#: (upstream: "system/physmem: Fix migration dirty bitmap coherency with TCG
#: memory access", QEMU 9.0).  Measured here with QEMU 7.2 and no qmpmig in
#: the loop: 5 migrations in 8 lost 4 to 17 pages.  A block this much longer
#: takes the page-at-a-time sync, which does reset the TLB (0 in 8).  8 KiB:
#: QEMU rounds -m up to a multiple of 8 KiB.
TCG_RAM_PAD = 8 << 10
HEARTBEAT = re.compile(rb"^qmpmig-heartbeat (\d+)\r?$", re.M)

#: The TCG CPU model: a plain, well-trodden one for migration.
TCG_CPU = os.environ.get("QMPMIG_TCG_CPU", "qemu64")


def sweep_stale() -> list[Path]:
    """Remove what qmpmig processes that are gone (killed before they could
    clean up) left: guest RAM files in /dev/shm, work directories (QMP,
    device and migration sockets, consoles) in the temporary directory.
    Both carry their maker's pid.  Returns what was removed."""
    removed = []
    for pattern, root in (("qmpmig-*.ram", Path("/dev/shm")), ("qmpmig-rig-*", Path(tempfile.gettempdir())),
                          ("qmpmig-vm-*", Path(tempfile.gettempdir()))):
        for path in root.glob(pattern):
            pid = path.name.split("-")[2 if path.name.startswith(("qmpmig-rig-", "qmpmig-vm-")) else 1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def image() -> tuple[Path, Path]:
    """The test guest's kernel and initramfs; VmError if not built."""
    kernel, initrd = IMAGE_DIR / "vmlinuz", IMAGE_DIR / "initramfs.cpio.gz"
    if not (kernel.exists() and initrd.exists()):
        raise VmError(f"test guest not built in {IMAGE_DIR}: run vm-images/build.sh")
    return kernel, initrd


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def accel() -> str:
    """``kvm`` only where KVM has been proven to boot the test guest on this
    machine (once per host boot, cached), else ``tcg``.  QMPMIG_ACCEL=tcg|kvm
    overrides.  Nested KVM here is present but unreliable, hence the proof."""
    forced = os.environ.get("QMPMIG_ACCEL", "auto")
    if forced in ("tcg", "kvm"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    cache = Path(tempfile.gettempdir()) / f"qmpmig-accel-{_boot_id()}"
    if cache.exists():
        return cache.read_text().strip()
    result = "kvm" if _kvm_boots() else "tcg"
    cache.write_text(result)
    return result


@functools.cache
def qemu_version() -> tuple[int, int]:
    """(major, minor) of the QEMU the rig starts."""
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"version (\d+)\.(\d+)", out)
    if not found:
        raise VmError(f"cannot tell the version of {QEMU}: {out.strip()!r}")
    return int(found[1]), int(found[2])


def _kvm_boots(timeout: float = 20.0) -> bool:
    with Vm("kvm-probe", "source", accel="kvm", memory_mib=128) as vm:
        try:
            vm.start()
            vm.wait_heartbeat(2, timeout)
            return True
        except VmError:
            return False


class Vm:
    """One QEMU running the test guest."""

    def __init__(self, name: str, role: Role, *, memory_mib: int = 256,
                 accel: str | None = None, workdir: Path | None = None,
                 extra_args: tuple[str, ...] = (), launcher: tuple[str, ...] = ()):
        self.name = name
        self.role = role
        self.memory_mib = memory_mib
        self._accel = accel
        self.extra_args = extra_args
        #: A command QEMU's command line is handed to (e.g. nsenter into the
        #: namespaces of another "host"); it must exec QEMU in its place.
        self.launcher = launcher
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"qmpmig-vm-{os.getpid()}-{name}-"))
        #: The monitor a manager (qmpmig's daemon, libvirt) drives the VM by.
        self.qmp_path = self.workdir / f"{name}.qmp"
        #: A second monitor, for the rig's own observation and faults.
        self.observer_qmp_path = self.workdir / f"{name}-observer.qmp"
        self.serial_path = self.workdir / f"{name}.serial"
        self.log_path = self.workdir / f"{name}.log"
        self.ram_path = Path("/dev/shm") / f"qmpmig-{os.getpid()}-{self.workdir.name}-{name}.ram"
        self.proc: subprocess.Popen | None = None

    @property
    def dma_window(self) -> tuple[int, int]:
        """(guest physical base, size) of the RAM reserved for device DMA."""
        return DMA_WINDOW

    @property
    def ram_size(self) -> int:
        """Bytes of guest RAM: ``memory_mib``, and TCG_RAM_PAD under TCG on a
        QEMU that needs it."""
        pad = TCG_RAM_PAD if self.accel == "tcg" and qemu_version() < (9, 0) else 0
        return (self.memory_mib << 20) + pad

    @property
    def accel(self) -> str:
        if self._accel is None:
            self._accel = accel()
        return self._accel

    def argv(self) -> list[str]:
        kernel, initrd = image()
        cpu = "host" if self.accel == "kvm" else TCG_CPU
        argv = [
            QEMU, "-name", self.name, "-nodefaults", "-no-user-config",
            "-machine", f"q35,accel={self.accel},memory-backend=ram0",
            "-cpu", cpu, "-m", f"{self.ram_size >> 10}K", "-smp", "1",
            "-object", f"memory-backend-file,id=ram0,size={self.ram_size >> 10}K,"
                       f"mem-path={self.ram_path},share=on",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"{GUEST_APPEND} memmap={DMA_WINDOW[1] >> 20}M${DMA_WINDOW[0]:#x}",
            "-display", "none", "-no-reboot",
            "-chardev", f"file,id=serial0,path={self.serial_path}",
            "-serial", "chardev:serial0",
            "-chardev", f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
            "-chardev", f"socket,id=qmp1,path={self.observer_qmp_path},server=on,wait=off",
            "-mon", "chardev=qmp1,mode=control",
        ]
        if self.role == "destination":
            argv += ["-incoming", "defer", "-S"]
        return argv + list(self.extra_args)

    def start(self) -> "Vm":
        if self.proc is not None:
            raise VmError(f"{self.name} already started")
        sweep_stale()
        # Guest RAM is the guest's secrets: a file of ours alone, which QEMU
        # (memory-backend-file on an existing file) sizes and keeps as it is.
        fd = os.open(self.ram_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        os.close(fd)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*self.launcher, *self.argv()], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        deadline = time.monotonic() + 10
        while not (self.qmp_path.exists() and self.observer_qmp_path.exists()):
            self.check_alive()
            if time.monotonic() > deadline:
                raise VmError(f"{self.name}: no QMP socket after 10 s")
            time.sleep(0.02)
        return self

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise VmError(f"{self.name}: QEMU exited ({code}): {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def heartbeats(self) -> list[int]:
        """Every heartbeat number on the serial console so far."""
        try:
            data = self.serial_path.read_bytes()
        except FileNotFoundError:
            return []
        return [int(n) for n in HEARTBEAT.findall(data)]

    def last_heartbeat(self) -> int:
        beats = self.heartbeats()
        return beats[-1] if beats else 0

    def wait_heartbeat(self, above: int = 0, timeout: float = 60.0) -> int:
        """Wait for a heartbeat numbered above ``above``; return the newest."""
        deadline = time.monotonic() + timeout
        while (beat := self.last_heartbeat()) <= above:
            self.check_alive()
            if time.monotonic() > deadline:
                raise VmError(f"{self.name}: no heartbeat above {above} within {timeout:.0f} s")
            time.sleep(0.1)
        return beat

    def kill(self) -> None:
        """SIGKILL QEMU, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self, timeout: float = 5.0) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL) and remove every file it made."""
        stop_process(self.proc, timeout)
        self.ram_path.unlink(missing_ok=True)
        self.qmp_path.unlink(missing_ok=True)
        self.observer_qmp_path.unlink(missing_ok=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
