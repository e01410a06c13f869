"""Pre-copy and the grace state: the devices running (DMA logged) while
QEMU sends guest RAM, QEMU held only near the end, the grace state (NDMA)
with the vCPUs running, and the vCPU stop once what is left fits the
downtime budget.

QEMU switches over whenever what it has left, after a dirty-bitmap sync, is
under its measured bandwidth x downtime-limit; no setting stops that once
its first RAM pass is done and the guest happens to dirty little (with
downtime-limit 0, QEMU 7.2 does not even sync again: it switches over right
after the first pass; reference/qemu-migration-qmp.md), and max-bandwidth
takes effect at once.  So QEMU sends RAM at full speed, downtime-limit at
1 ms, while the devices run in PRE_COPY with their DMA logged (the
controller copies the pages they write: seed 000's reason for the dirty
log); a watcher holds QEMU's bandwidth low once its first pass is near its
end, so the pass cannot end on its own; once the devices have converged
too they enter the grace state, QEMU gets its bandwidth back with the
budget as downtime-limit, and the vCPUs stop as soon as QEMU's RAM and the
devices' pending data fit the budget at the rates measured in this
migration.  The devices' DMA outage is then that last stretch, whatever
the size of guest RAM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from ..errors import EarlySwitchover, MigrationFailed, QmpmigError
from ..migration import fsm
from ..migration.states import MigState
from ..qemu.qmp import ENDING, PRECOPY, Qemu
from .manager import CAPABILITIES, PARAMETERS
from .walk import grace_target

if TYPE_CHECKING:
    from .core import Controller

log = logging.getLogger("qmpmig.controller")

HOLD_BANDWIDTH = 4 << 20
HOLD_DOWNTIME_MS = 1
#: QEMU is held once its first pass has this little left: what it sends in
#: APPROACH_LEAD seconds at the measured rate, never less than APPROACH_MIN.
#: What is left then goes in the device outage.  Closer to the end (0.1 s,
#: 16 MiB) cut the outage by a third, but the destination's guest kernel
#: then died on bad memory in about one migration in six (TCG, QEMU 7.2):
#: QEMU's own lost stores, since explained (docs/known-problems.md); the
#: closer lead has not been measured again.
APPROACH_LEAD = 0.25
APPROACH_MIN = 32 << 20
#: Seconds between two looks at QEMU's RAM.
WATCH_EVERY = 0.02
#: The lead is at least this many times the time the last look took to
#: come round: on a loaded machine the looks come late, and QEMU, not held
#: by then, finishes its pass and switches over by itself (one migration in
#: 63 of a soak with the machine's two CPUs at a load of 6).
LATE_LOOKS = 3
#: The estimate of what is left must improve within this many seconds, or
#: the budget is raised (up to Options.max_downtime_limit).
STALL_WINDOW = 1.0
#: Bytes, and seconds, a device may move per pre-copy round before
#: convergence is looked at again.
PRECOPY_ROUND = 64 << 20
PRECOPY_SLICE = 0.25


class Rate:
    """Bytes per second over the last ``window`` seconds of samples of a
    growing count (bytes transferred)."""

    def __init__(self, window: float = 0.5):
        self.window = window
        self.samples: list[tuple[float, int]] = []

    def add(self, count: int | None) -> None:
        if count is None:
            return
        now = time.monotonic()
        self.samples.append((now, count))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.pop(0)

    def reset(self) -> None:
        self.samples.clear()

    @property
    def per_second(self) -> float | None:
        if len(self.samples) < 2 or self.samples[-1][0] - self.samples[0][0] <= 0:
            return None
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        return (c1 - c0) / (t1 - t0)


async def prepare_switchover(c: Controller) -> None:
    """Capabilities for the flow, downtime-limit at 1 ms for the pre-copy
    (unless the no-hold negative control says otherwise); the bandwidth is
    left as it is until the watcher holds it.  :attr:`Run.release` gives
    QEMU its bandwidth back with the budget, :func:`restore_settings` puts
    back what was there before (the manager's: QEMU's own settings, or
    libvirt's)."""
    c.run.settings = await c.manager.settings(c)
    c.note("settings", settings=c.run.settings)
    await c.manager.enable(c)
    c.run.budget = c.options.downtime_limit
    c.run.release = {"max-bandwidth": c.run.settings["src"]["parameters"].get("max-bandwidth", 128 << 20),
                     "downtime-limit": c.options.downtime_limit}
    if "no-hold" not in c.options.debug:
        await c.manager.set_parameters(c, {"downtime-limit": HOLD_DOWNTIME_MS})


async def watch_ram(c: Controller) -> None:
    """While QEMU sends its first pass at full speed: its rate, and the hold
    (max-bandwidth low) once what is left is near its end."""
    rate = c.run.ram_rate
    looked = time.monotonic()
    while not c.run.held:
        info = await c.src.qemu.query_migrate()
        if info.status not in PRECOPY:
            return
        # The next look may be as late as this one was (a loaded machine):
        # QEMU must not reach the end of its pass in between.
        now = time.monotonic()
        lead, looked = max(APPROACH_LEAD, LATE_LOOKS * (now - looked)), now
        rate.add(info.ram_transferred)
        c.run.ram_remaining = left = info.ram_remaining
        near = max(APPROACH_MIN, (rate.per_second or 0) * lead)
        if left is not None and left <= near and "no-hold" not in c.options.debug:
            await c.manager.set_parameters(c, {"max-bandwidth": HOLD_BANDWIDTH})
            c.run.held = True
            log.info("QEMU held with %d MiB of its first pass left (%.0f MiB/s)", left >> 20,
                     (rate.per_second or 0) / 2**20)
            return
        await asyncio.sleep(WATCH_EVERY)


async def settings_now(qemu: Qemu) -> dict:
    """The source capabilities and the parameters a migration changes, as
    QEMU has them now."""
    caps = {c["capability"]: c["state"] for c in await qemu.execute("query-migrate-capabilities")}
    params = await qemu.execute("query-migrate-parameters")
    return {"capabilities": {name: caps.get(name) for name in CAPABILITIES["src"]},
            "parameters": {name: params.get(name) for name in PARAMETERS}}


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
            await c.manager.put_back(side, saved)
        except QmpmigError as err:
            if not await side.wait_gone(1.0):
                problems.append(f"{side.name} QEMU settings not restored: {err}")
    return problems


async def converge(c: Controller) -> None:
    """Pre-copy, the devices running, until QEMU is held near the end of its
    first pass (or, without the hold, has sent as much as it would) and
    every device has converged: at most ``threshold`` pending, or all of
    it within the budget at the rate it moves.  Where the devices stop
    converging, the budget is raised (:class:`Stall`), or the migration
    fails before any device left PRE_COPY."""
    opts = c.options
    start = time.monotonic()
    stall = Stall(c)
    if c.run.held:
        # Held from the start (a manager that started QEMU's migration before
        # the destination's devices were there): full speed now.
        await c.manager.set_parameters(c, {"max-bandwidth": c.run.release["max-bandwidth"]})
        c.run.held = False
    watcher = asyncio.create_task(watch_ram(c))
    try:
        while True:
            await asyncio.gather(*(c.pump.move(p, PRECOPY_ROUND, PRECOPY_SLICE) for p in c.pairs))
            for pair in c.pairs:
                await c.pump.dma_report(pair)
            await check_still_precopy(c)
            if watcher.done():
                watcher.result()            # its failure, if it failed
            pending = await _pending(c)
            c.progress(c.run.ram_remaining, pending)
            devices_ms = _devices_ms(c, pending)
            fits = max(pending, default=0) <= opts.threshold or (devices_ms is not None
                                                                 and devices_ms <= c.run.budget)
            if not (c.run.held or "no-hold" in opts.debug):
                await asyncio.sleep(0.05)
                continue
            if time.monotonic() - start >= opts.min_precopy and fits:
                return
            await stall.check(devices_ms, f"the devices have {sum(pending) >> 10} KiB pending "
                                          f"({_rates(c)}), QEMU is held")
            await asyncio.sleep(0.05)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, QmpmigError):
            await watcher


class Stall:
    """What is left (an estimate in ms) must keep falling: where it has not
    improved for STALL_WINDOW, the budget doubles, up to
    max_downtime_limit; past that, or past max_precopy, the migration fails
    with the figures."""

    def __init__(self, c: Controller):
        self.c = c
        self.best, self.since = float("inf"), time.monotonic()
        self.deadline = self.since + c.options.max_precopy

    async def check(self, left_ms: float | None, figures: str) -> None:
        c, now = self.c, time.monotonic()
        if left_ms is not None and left_ms < 0.95 * self.best:
            self.best, self.since = left_ms, now
            return
        if now - self.since <= STALL_WINDOW and now <= self.deadline:
            return
        limit = c.options.max_downtime_limit
        if c.run.budget >= limit or now > self.deadline:
            raise MigrationFailed(f"pre-copy does not converge: {figures}; estimated "
                                  f"{'?' if left_ms is None else round(left_ms)} ms against a budget of "
                                  f"{c.run.budget} ms (--max-downtime-limit {limit} ms)")
        c.run.budget = min(2 * c.run.budget, limit)
        log.warning("pre-copy stalls (%s): downtime budget raised to %d ms", figures, c.run.budget)
        c.trace.emit("phase", name="budget", budget_ms=c.run.budget)
        await _release(c)
        self.best, self.since = float("inf"), now


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
        await (switch_over(c) if c.manager.answers_pre_switchover else stop_held(c))


async def switch_over(c: Controller) -> None:
    """Every device is in the grace state: release QEMU with the budget,
    let the rest of its RAM and the devices' data go, and stop the vCPUs
    once what is left fits the budget at this migration's rates (unless
    QEMU stopped them itself, its own judgement of the same).  A stall
    raises the budget, or fails (:class:`Stall`)."""
    c.run.held = False
    await _release(c)
    stall = Stall(c)
    while True:
        await asyncio.gather(*(c.pump.move(p, PRECOPY_ROUND, PRECOPY_SLICE) for p in c.pairs))
        if c.src.vm.status in ENDING or c.src.gone or c.dst.gone:
            await check_still_precopy(c)
        if c.src.vm.runstate != "running":
            c.vcpus_stopped()
            return
        info = await c.src.qemu.query_migrate()
        c.run.ram_rate.add(info.ram_transferred)
        c.run.ram_remaining = info.ram_remaining
        pending = await _pending(c)
        c.progress(info.ram_remaining, pending)
        left_ms = _estimate_ms(c, info.ram_remaining, pending)
        if left_ms is not None and left_ms <= c.run.budget:
            await drain_page_requests(c)
            await stop_vcpus(c)
            return
        await stall.check(left_ms, f"QEMU has {(info.ram_remaining or 0) >> 20} MiB of RAM left, "
                                   f"the devices {sum(pending) >> 10} KiB ({_rates(c)})")
        await c.src.next_update(0.05)


async def stop_held(c: Controller) -> None:
    """Every device is in the grace state and QEMU is held; libvirt answers
    pre-switchover at once (docs/libvirt-flow.md), so the vCPUs stop with
    QEMU still held, and the devices' stop-copy must end before it is
    released.  Once the vCPUs stop, QEMU completes as soon as it has sent
    what is dirty, and zero pages cost it almost nothing on the wire: the
    manager holds it to a trickle first (:meth:`hold_for_stop`)."""
    if not c.run.held:
        raise MigrationFailed("QEMU is not held: the devices' stop-copy would race its switchover, which its "
                              "manager answers at once; the vCPUs were not stopped")
    await c.manager.hold_for_stop(c)
    await drain_page_requests(c)
    await stop_vcpus(c)


async def _pending(c: Controller) -> list[int]:
    """Each source device's pending bytes, each query bounded like any
    other request (a device that stops answering here fails the migration)."""
    return [await c.walker.call(p.src, p.src.device.pending(), "a pending-bytes query") for p in c.pairs]


async def _release(c: Controller) -> None:
    """QEMU's downtime-limit: the budget less what the devices' pending data
    will take at their rates; and, unless held, its bandwidth back."""
    pending = await _pending(c)
    c.run.release["downtime-limit"] = max(HOLD_DOWNTIME_MS, int(c.run.budget - (_devices_ms(c, pending) or 0)))
    if not c.run.held:
        await c.manager.set_parameters(c, c.run.release)
        c.run.ram_rate.reset()


def _rates(c: Controller) -> str:
    """The throughputs measured so far, for a message."""
    ram = c.run.ram_rate.per_second
    devices = ", ".join(f"{p.name} {(p.rate or 0) / 2**20:.0f} MiB/s" for p in c.pairs)
    return f"QEMU {'?' if ram is None else f'{ram / 2**20:.0f}'} MiB/s, {devices}"


def _devices_ms(c: Controller, pending: list[int]) -> float | None:
    """Milliseconds the devices' pending data takes at their rates so far
    (one after another, as stop-copy reads them)."""
    total = 0.0
    for pair, left in zip(c.pairs, pending):
        rate = pair.rate
        if left and not rate:
            return None
        total += left / rate * 1000 if left else 0.0
    return total


def _estimate_ms(c: Controller, ram_left: int | None, pending: list[int]) -> float | None:
    """Milliseconds QEMU's RAM and the devices' data left would take."""
    rate, devices = c.run.ram_rate.per_second, _devices_ms(c, pending)
    if ram_left is None or not rate or devices is None:
        return None
    return ram_left / rate * 1000 + devices


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
    await c.manager.stop(c)
