"""Pre-copy and the grace state: holding QEMU's switchover while the
devices converge, NDMA with the vCPUs running, and the vCPU stop.

QEMU switches over whenever what it has left, after a dirty-bitmap sync, is
under bandwidth x downtime-limit; no setting stops that once its first RAM
pass is done and the guest happens to dirty little (with downtime-limit 0,
QEMU 7.2 does not even sync again: it switches over right after the first
pass; reference/qemu-migration-qmp.md).  So the hold keeps the first pass
from ending: max-bandwidth is held low until every device has converged and
reached the grace state; then QEMU gets its bandwidth back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ..errors import EarlySwitchover, MigrationFailed, QmpmigError
from ..migration import fsm
from ..migration.states import MigState
from ..qemu.qmp import ENDING, PRECOPY
from .walk import grace_target

if TYPE_CHECKING:
    from .core import Controller

log = logging.getLogger("qmpmig.controller")

HOLD_BANDWIDTH = 4 << 20
HOLD_DOWNTIME_MS = 1
#: The migration capabilities the flow turns on, per side.
CAPABILITIES = {"src": ("events", "pause-before-switchover"), "dst": ("events",)}
#: The migration parameters the hold changes (on the source).
PARAMETERS = ("max-bandwidth", "downtime-limit")
#: Bytes a device may move per pre-copy round before convergence is looked at again.
PRECOPY_ROUND = 64 << 20


async def hold_switchover(c: Controller) -> None:
    """Capabilities for the flow, and QEMU's switchover held (unless the
    no-hold negative control says otherwise); :attr:`Run.release` gives it
    back, :func:`restore_settings` puts back what was there before."""
    for side in (c.src, c.dst):
        caps = {cap["capability"]: cap["state"] for cap in await side.qemu.execute("query-migrate-capabilities")}
        c.run.settings[side.name] = {"capabilities": [
            {"capability": name, "state": caps.get(name, False)} for name in CAPABILITIES[side.name]]}
    params = await c.src.qemu.execute("query-migrate-parameters")
    c.run.settings["src"]["parameters"] = {name: params[name] for name in PARAMETERS if name in params}
    c.note("settings", settings=c.run.settings)
    for side in (c.src, c.dst):
        await side.qmp("migrate-set-capabilities", {"capabilities": [
            {"capability": name, "state": True} for name in CAPABILITIES[side.name]]})
    c.run.release = {"max-bandwidth": params.get("max-bandwidth", 128 << 20),
                     "downtime-limit": c.options.downtime_limit}
    if "no-hold" not in c.options.debug:
        await c.src.qmp("migrate-set-parameters", {"downtime-limit": HOLD_DOWNTIME_MS,
                                                   "max-bandwidth": HOLD_BANDWIDTH})


async def restore_settings(c: Controller) -> list[str]:
    """Put back the capabilities and parameters the flow changed, on each
    QEMU that still runs and no longer migrates; what could not be put
    back, said."""
    problems = []
    for side in (c.src, c.dst):
        saved = c.run.settings.pop(side.name, None)
        if saved is None or side.gone:
            continue
        try:
            await put_back(side.qmp, saved)
        except QmpmigError as err:
            if not await side.wait_gone(1.0):
                problems.append(f"{side.name} QEMU settings not restored: {err}")
    return problems


async def put_back(execute, saved: dict) -> None:
    """Set QEMU's migration parameters and capabilities as ``saved`` has
    them, through ``execute(command, arguments)``."""
    if "parameters" in saved:
        await execute("migrate-set-parameters", saved["parameters"])
    await execute("migrate-set-capabilities", {"capabilities": saved["capabilities"]})


async def converge(c: Controller) -> None:
    """Pre-copy until every device and QEMU's RAM have converged."""
    opts = c.options
    start = time.monotonic()
    while True:
        await asyncio.gather(*(c.pump.move(p, PRECOPY_ROUND) for p in c.pairs))
        for pair in c.pairs:
            await c.pump.dma_report(pair)
        await check_still_precopy(c)
        pending = [await p.src.device.pending() for p in c.pairs]
        ram = (await c.src.qemu.query_migrate()).ram_remaining
        elapsed = time.monotonic() - start
        c.progress(ram, pending)
        if elapsed >= opts.min_precopy and max(pending, default=0) <= opts.threshold:
            return
        if elapsed > opts.max_precopy:
            log.warning("pre-copy did not converge in %.0f s (pending %s, RAM %s): going on",
                        elapsed, pending, ram)
            return
        await asyncio.sleep(0.1)


async def grace(c: Controller) -> None:
    """Every device to NDMA with the vCPUs running, every page request
    completed, and only then the vCPU stop."""
    if "stop-before-ndma" in c.options.debug:
        await stop_vcpus(c)
        for _ in range(200):  # let the devices run into a page request
            if any(end.outstanding for end in c.src.devices):
                break
            await asyncio.sleep(0.01)
    all_p2p = all(fsm.supports(end.device.flags, MigState.PRE_COPY_P2P) for end in c.src.devices)
    await c.walker.walk_all(c.src, grace_target, barrier=MigState.PRE_COPY_P2P if all_p2p else None)
    await drain_page_requests(c)
    if not c.run.we_stopped:
        await check_still_precopy(c)
        await ram_precopy(c)


async def ram_precopy(c: Controller) -> None:
    """Every device is in the grace state: release QEMU, let its RAM
    pre-copy converge while the devices stream what still changes, and stop
    the vCPUs once it has (unless QEMU stopped them itself, which is the
    reference flow's vCPU stop too now that every device is in NDMA)."""
    opts = c.options
    await c.src.qmp("migrate-set-parameters", c.run.release)
    deadline = time.monotonic() + opts.max_precopy
    while True:
        await asyncio.gather(*(c.pump.move(p, PRECOPY_ROUND) for p in c.pairs))
        if c.src.vm.status in ENDING or c.src.gone or c.dst.gone:
            await check_still_precopy(c)
        if c.src.vm.runstate != "running":
            c.vcpus_stopped()
            return
        ram = (await c.src.qemu.query_migrate()).ram_remaining
        c.progress(ram, [])
        if ram is not None and ram <= opts.ram_threshold or time.monotonic() > deadline:
            await drain_page_requests(c)
            await stop_vcpus(c)
            return
        await asyncio.sleep(0.02)


async def check_still_precopy(c: Controller) -> None:
    """Pre-copy goes on only while nothing ended it.  QEMU can switch over by
    itself when it finds nothing left to send: then its vCPUs stopped before
    our grace state (EarlySwitchover)."""
    src, dst = c.src, c.dst
    state = src.vm
    if not src.gone and (state.status in ENDING or dst.gone):
        # A cancel on the source ends the destination too: say the cause.
        info = await src.qemu.query_migrate()
        if info.status in ("cancelling", "cancelled"):
            raise MigrationFailed("the migration was cancelled on the source (migrate_cancel)")
        if info.status == "failed":
            # The usual cause is the other end going away: give its
            # monitor's EOF a moment to arrive, to say so.
            await dst.wait_gone(1.0)
            raise MigrationFailed(f"source migration failed: {info.error_desc or 'no reason given'}"
                                  + (f"; destination QEMU died: {dst.gone}" if dst.gone else ""))
    if src.gone:
        raise MigrationFailed(f"source QEMU died: {src.gone}")
    if dst.gone:
        raise MigrationFailed(f"destination QEMU died: {dst.gone}")
    if state.runstate != "running" or state.status not in PRECOPY:
        raise EarlySwitchover(f"QEMU stopped the vCPUs and switched over by itself before the grace "
                              f"state (source at {state})")


async def drain_page_requests(c: Controller) -> None:
    """Seed 000: every IO page request completes while the vCPUs run."""
    deadline = time.monotonic() + min(c.options.page_request_timeout, c.walker.paused_timeout or float("inf"))
    ends = c.src.devices + c.dst.devices
    while any(end.outstanding for end in ends):
        if time.monotonic() > deadline:
            stuck = {f"{end.side.name} {end.name}": end.outstanding for end in ends if end.outstanding}
            raise MigrationFailed(f"IO page requests stuck with the vCPUs stopped: {stuck}")
        await asyncio.sleep(0.01)


async def stop_vcpus(c: Controller) -> None:
    c.vcpus_stopped()
    c.run.we_stopped = True
    await c.src.qmp("stop")
