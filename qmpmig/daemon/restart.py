"""A daemon started after one that died: end each migration its journal
left half done, so that the guest runs on exactly one side.

The rule is :func:`.journal.winner`'s.  For the source: the migration
cancelled, the vCPUs running again if they ran before, QEMU's settings put
back, the destination QEMU ended.  For the destination: its vCPUs started
if the guest ran, its settings put back; the source stays where QEMU left
it (``postmigrate``).  The devices were reset when the old daemon's
connections closed: that loss is the one a restart cannot undo.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from ..errors import QemuGone, QmpmigError
from ..controller.manager import put_back
from ..qemu.qmp import IDLE, Qemu
from .journal import Unfinished, winner

log = logging.getLogger("qmpmig.daemon")

#: Seconds one QEMU may take for each step.
STEP_TIMEOUT = 10.0


async def end_unfinished(m: Unfinished) -> tuple[bool, str]:
    """End one migration; (the guest runs on the destination, what was
    done).  A QEMU whose monitor does not answer (rather than one that is
    gone) leaves the migration unsettled: QmpmigError, and a later start
    tries again."""
    side = winner(m)
    notes = [f"the daemon died in {m.phase}: the guest goes on at the "
             + ("destination, every device there having loaded its state" if side == "dst" else "source")]
    src, dst = await _connect(m.begin["src"]), await _connect(m.begin["dst"])
    if m.begin.get("peer"):
        notes.append(f"the destination is a VM of the daemon at {m.begin['peer']}: that daemon keeps it "
                     f"(paused, never started by it); this one can neither end nor start it")
    try:
        if side == "src":
            # The loser first: once asked to listen, the destination may
            # hold a copy of the guest; it must be gone before the source
            # runs again.
            if dst and m.incoming:
                notes.append(await _quit(dst))
            notes += await _fall_back(src, m) if src else ["the source QEMU is gone"]
        else:
            notes += await _go_on(dst, m) if dst else ["the destination QEMU is gone"]
            if src:
                notes += await _restore(src, m.settings.get("src"))
    finally:
        for qemu in (src, dst):
            if qemu:
                await qemu.disconnect()
    return side == "dst", "; ".join(notes)


async def _connect(path: str) -> Qemu | None:
    """A QMP session, or None when that QEMU is gone (no socket, or nobody
    listening on it) or not on this host (no path: a peer daemon's VM)."""
    if not path:
        return None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    finally:
        probe.close()
    qemu = Qemu(path)
    try:
        await qemu.connect(path, timeout=STEP_TIMEOUT)
    except QemuGone as err:
        raise QmpmigError(f"QEMU at {path} does not answer: {err}") from err
    return qemu


async def _fall_back(src: Qemu, m: Unfinished) -> list[str]:
    notes = []
    info = await src.query_migrate()
    if info.status not in IDLE:
        await src.execute("migrate_cancel")
        notes.append(f"source migration ({info.status}) cancelled")
        async with asyncio.timeout(STEP_TIMEOUT):
            while (await src.query_migrate()).status not in IDLE:
                await asyncio.sleep(0.05)
    status = await src.query_status()
    if m.begin.get("running") and not status.running:
        await src.execute("cont")
        notes.append(f"source vCPUs started again (were {status.runstate})")
    return notes + await _restore(src, m.settings.get("src"))


async def _go_on(dst: Qemu, m: Unfinished) -> list[str]:
    notes = []
    status = await dst.query_status()
    if m.begin.get("running") and not status.running:
        await dst.execute("cont")
        notes.append(f"destination vCPUs started (were {status.runstate})")
    return notes + await _restore(dst, m.settings.get("dst"))


async def _restore(qemu: Qemu, saved: dict | None) -> list[str]:
    """QEMU's migration settings as they were before the flow changed them."""
    if not saved:
        return []
    try:
        await put_back(qemu.execute, saved)
    except QmpmigError as err:
        return [f"{qemu.name} settings not restored: {err}"]
    return [f"{qemu.name} settings restored"]


async def _quit(qemu: Qemu) -> str:
    with contextlib.suppress(QemuGone):
        await asyncio.wait_for(qemu.execute("quit"), STEP_TIMEOUT)
    return "destination QEMU ended"
