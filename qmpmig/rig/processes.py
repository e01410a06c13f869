"""Processes the rig starts: each dies with its starter (PR_SET_PDEATHSIG)
and is stopped politely, then not; a ``qmpmig-device`` process leaves no
socket behind."""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import QmpmigError


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the starting thread exits."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def stop_process(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


#: /proc/net/unix Flags of a listening socket (__SO_ACCEPTCON).
ACCEPTCON = 0x10000


def listening(path: Path) -> bool:
    """A UNIX socket at ``path`` takes connections, seen without connecting
    (a server of one client would take the probe for its client): bound is
    not enough, a server that has not yet called listen() refuses them.  A
    socket bound under another name and renamed into place (as qmpmig's
    device does, once it listens) is not in the table under ``path``."""
    if not path.exists():
        return False
    with open("/proc/net/unix") as table:
        next(table)
        bound = [int(fields[3], 16) for fields in map(str.split, table) if len(fields) >= 8 and fields[7] == str(path)]
    return not bound or any(flags & ACCEPTCON for flags in bound)


class DeviceProcess:
    """``qmpmig-device --socket PATH [options]`` in its own process; or,
    given ``command``, any vfio-user server: the command line with
    ``{sock}`` standing for the socket's path."""

    def __init__(self, socket: str | Path, *options: str, log: Path | None = None, nice: int = 0,
                 command: str | None = None):
        self.socket = Path(socket)
        self.options = options
        self.log_path = log or self.socket.with_suffix(".log")
        self.nice = nice
        self.command = command
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        if self.command:
            return [part.replace("{sock}", str(self.socket)) for part in shlex.split(self.command)]
        return [sys.executable, "-m", "qmpmig.device.cli", "--socket", str(self.socket), *self.options]

    @property
    def name(self) -> str:
        return Path(self.argv()[0]).name if self.command else "qmpmig-device"

    def start(self, timeout: float = 10.0) -> "DeviceProcess":
        self.socket.unlink(missing_ok=True)
        argv = self.argv()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=self._child_setup)
        deadline = time.monotonic() + timeout
        while not listening(self.socket):
            if self.proc.poll() is not None:
                raise QmpmigError(f"{self.name} exited ({self.proc.returncode}): {self.log_tail()}")
            if time.monotonic() > deadline:
                raise QmpmigError(f"{self.name}: no socket at {self.socket} after {timeout} s")
            time.sleep(0.01)
        return self

    def _child_setup(self) -> None:
        die_with_parent()
        if self.nice:
            os.nice(self.nice)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def close(self, timeout: float = 5.0) -> None:
        stop_process(self.proc, timeout)
        self.socket.unlink(missing_ok=True)

    def __enter__(self) -> "DeviceProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
