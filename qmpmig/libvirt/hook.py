"""libvirt's QEMU hook for domains with qmpmig devices.

libvirt runs every executable in ``/etc/libvirt/hooks/qemu.d/`` (libvirt
6.5 and later) as ``<hook> <domain> <operation> <sub-operation> <extra>``
with the domain's XML on stdin, synchronously: libvirt waits, so the hook
must be quick, and it must never call back into libvirt (that deadlocks).
What takes time goes to a detached ``qmpmig libvirt`` process; the hook
itself only starts processes and asks the local daemon one question.

The operations it acts on (reference: libvirt docs/hooks.rst):

- ``prepare begin``: start each declared device process (``command=``),
  detached, its output in the run directory's log; a command that cannot
  start fails the domain's start, with the reason.
- ``started begin``: hand the domain to the host's daemon, which owns its
  devices from then on (``qmpmig libvirt adopt``, detached: it waits for
  the second QMP monitor and the device sockets, then attaches).
- ``release end``: take the domain back (the daemon lets go; the devices
  reset) and stop the device processes the hook started (detached).
- ``migrate begin`` (on the destination, before anything starts there):
  an incoming migration that qmpmig is not driving would arrive without
  the devices' state; it is refused (a non-zero exit cancels it) with a
  message that names ``qmpmig migrate --libvirt``, unless the domain's
  metadata allows following (``incoming="follow"``): then the source
  host's daemon follows it, which under libvirt means recording that
  the rules leave it no window, and cancelling it before its switchover.
  One qmpmig drives carries a migration id in the domain's metadata that
  the destination's daemon was told to expect.

Every other call, and every domain without qmpmig metadata, is left alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import domain
from .domain import DomainSpec

#: Where, under the run directory, the hook keeps each domain's processes.
STATE_DIR = "libvirt"


def _domain_dir(run_dir: Path, name: str) -> Path:
    path = run_dir / STATE_DIR / name.replace("/", "_")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _detached(argv: list[str], log: Path, **popen) -> subprocess.Popen:
    """A process that outlives the hook: its own session, no terminal, no
    inherited fds, its output appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, close_fds=True, **popen)


def _qmpmig(*args: str) -> list[str]:
    return [sys.executable, "-m", "qmpmig", *args]


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), to tell it from a
    later process that got the same pid."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def start_devices(spec: DomainSpec, run_dir: Path) -> None:
    here = _domain_dir(run_dir, spec.name)
    started = []
    for dev in spec.devices:
        if not dev.command:
            continue
        program = (shlex.split(dev.command) or [""])[0]
        if not shutil.which(program):
            raise domain.DomainError(f"device {dev.name}: {program!r} is not an executable on this host")
        Path(dev.socket).parent.mkdir(parents=True, exist_ok=True)
        try:
            proc = _detached(["/bin/sh", "-c", f"exec {dev.command}"], here / f"{dev.name}.log")
        except OSError as err:
            raise domain.DomainError(f"device {dev.name}: {dev.command!r} did not start: {err}") from None
        started.append({"device": dev.name, "pid": proc.pid, "start": _start_time(proc.pid)})
    (here / "devices.json").write_text(json.dumps(started))


def started_devices(run_dir: Path, name: str) -> list[dict]:
    """The device processes the hook started for ``name`` (their record is
    taken: a later start of the domain writes its own)."""
    record = _domain_dir(run_dir, name) / "devices.json"
    try:
        started = json.loads(record.read_text())
    except (OSError, ValueError):
        return []
    record.unlink(missing_ok=True)
    return started


def stop_devices(started: list[dict], grace: float = 2.0) -> None:
    """SIGTERM the device processes of ``started``, SIGKILL what is left
    after ``grace`` seconds (only processes that are still the ones the
    hook started: pid and start time)."""
    alive = [p["pid"] for p in started if p.get("start") is not None and _start_time(p["pid"]) == p["start"]]
    for pid in alive:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if _start_time(pid) is not None and not _zombie(pid)]
    for pid in alive:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def hand_over(spec: DomainSpec, run_dir: Path) -> None:
    _detached(_qmpmig("libvirt", "adopt", spec.name, "--monitor", spec.monitor, "--run-dir", str(run_dir),
                      "--incoming", spec.incoming,
                      *[arg for dev in spec.devices for arg in ("--device", dev.socket)]),
              _domain_dir(run_dir, spec.name) / "adopt.log")


def take_back(spec: DomainSpec, run_dir: Path) -> None:
    _detached(_qmpmig("libvirt", "let-go", spec.name, "--monitor", spec.monitor, "--run-dir", str(run_dir),
                      "--started", json.dumps(started_devices(run_dir, spec.name))),
              _domain_dir(run_dir, spec.name) / "adopt.log")


class Refused(Exception):
    """The hook says no: libvirt cancels what it was about to do."""


def admit_incoming(spec: DomainSpec, run_dir: Path, migration: str | None) -> None:
    """``migrate begin`` on the destination: only a migration qmpmig drives
    (its id announced to this host's daemon) may bring these devices in."""
    names = ", ".join(dev.name for dev in spec.devices)
    if migration and _expected(run_dir, spec.name, migration):
        return
    if migration:
        raise Refused(f"domain {spec.name}: qmpmig migration {migration} was not announced to this host's "
                      f"daemon ({run_dir}); refused")
    if spec.incoming == "follow":
        return          # the source's daemon follows it (owner._stop_unmanaged)
    raise Refused(f"domain {spec.name} has qmpmig devices ({names}) whose state a plain migration would "
                  f"leave behind; refused.  Migrate it with: qmpmig migrate --libvirt {spec.name} --to URI")


def _expected(run_dir: Path, name: str, migration: str) -> bool:
    """Whether this host's daemon expects the migration; no daemon, or no
    answer within 5 s, is a no."""
    from ..daemon import client
    from ..errors import QmpmigError
    try:
        answer = asyncio.run(asyncio.wait_for(
            client.call(run_dir, "expected", domain=name, migration=migration), 5.0))
    except (QmpmigError, OSError, asyncio.TimeoutError):
        return False
    return bool(answer.get("expected"))


def run(argv: list[str], domain_xml: str, run_dir: Path) -> int:
    """One hook call; its exit status (non-zero: libvirt aborts the
    operation and logs what went to stderr)."""
    if len(argv) < 3:
        print("qmpmig hook: expected <domain> <operation> <sub-operation> [extra]", file=sys.stderr)
        return 2
    _, op, sub = argv[:3]
    if (op, sub) not in ACTIONS:
        return 0
    try:
        spec = domain.parse(domain_xml)
        if spec is None:
            return 0
        ACTIONS[op, sub](spec, run_dir, domain.migration_id(domain_xml))
    except (Refused, domain.DomainError, OSError) as err:
        print(f"qmpmig: {err}", file=sys.stderr)
        return 1
    return 0


#: (operation, sub-operation) -> what the hook does.
ACTIONS = {
    ("prepare", "begin"): lambda spec, run_dir, _: start_devices(spec, run_dir),
    ("started", "begin"): lambda spec, run_dir, _: hand_over(spec, run_dir),
    ("release", "end"): lambda spec, run_dir, _: take_back(spec, run_dir),
    ("migrate", "begin"): admit_incoming,
}
