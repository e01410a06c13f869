"""Seed 000's reference flows, each read top to bottom.

Save (source)::

    RUNNING + DMA logging           DIRTY_TRACKING on every device
    PRE_COPY                        QEMU's RAM pre-copy and ours, side by side;
                                    DMA logs read and cleared as we go
    PRE_COPY_P2P, vCPUs running     grace: every device, then every IO page
                                    request completed (barrier)
    QMP stop                        vCPUs stop only now
    pre-switchover: STOP_COPY       final data to end of stream, final DMA log
    migrate-continue                QEMU serialises the rest and completes

Resume (destination)::

    reset, STOP, RESUMING           before the stream arrives
    (QEMU RAM load completes)       copy every DMA-dirty page src -> dst RAM
    STOP                            each device validates its state
    RUNNING_P2P (barrier), RUNNING  then QMP cont

Every step goes through :func:`qmpmig.migration.fsm.plan` one arc at a
time (:class:`~.walk.Walker`), and into the trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING

from ..errors import MigrationFailed, QmpmigError
from ..migration.states import MigState
from ..qemu.qmp import IDLE, PRECOPY
from ..vfio_user.uapi import PAGE_SIZE
from . import precopy
from .walk import grace_target

if TYPE_CHECKING:
    from .core import Controller
    from .pump import Pair

log = logging.getLogger("qmpmig.controller")


async def migrate(c: Controller, running: bool) -> int | None:
    """A migration, seed 000's flow from end to end; QEMU's own downtime
    (ms) when it completes."""
    c.enter("setup")
    c.walker.resumed()
    await preflight(c)
    c.run.we_stopped = False
    for pair in c.pairs:
        pair.sent, pair.moved_seconds = 0, 0.0
    for end in (*c.src.devices, *c.dst.devices):
        end.dma_off_at = end.running_at = None
    c.trace.emit("phase", name="attempt", attempt=1)
    await precopy.prepare_switchover(c)
    await save(c, running)
    await resume(c, running)
    # Asked only now: the source's monitor can take a fifth of a second to
    # answer right after its completion, which the guest's pause must not
    # wait for (under libvirt it was asked at the completion: the source
    # QEMU is ended soon after).
    if c.run.qemu_downtime is None and not c.src.gone:
        with contextlib.suppress(QmpmigError):
            c.run.qemu_downtime = (await c.src.qemu.query_migrate()).downtime
    await finish_save(c)
    await c.manager.done(c)
    return c.run.qemu_downtime


async def preflight(c: Controller) -> None:
    """Refuse, before anything starts, what cannot migrate."""
    src, dst = c.src.vm, c.dst.vm
    if c.manager.dst_ready and (dst.runstate, dst.status) != ("inmigrate", "none"):
        raise MigrationFailed(f"destination is {dst}, not waiting with -incoming defer")
    if src.status not in IDLE:
        raise MigrationFailed(f"source is already migrating: {src}")
    caps = {cap["capability"]: cap["state"] for cap in await c.src.qemu.execute("query-migrate-capabilities")}
    if caps.get("postcopy-ram"):
        raise MigrationFailed("postcopy-ram is on: VFIO device migration has no postcopy (seed 002); "
                              "nothing was started")
    check_pairs(c)


def check_pairs(c: Controller) -> None:
    """Each pair speaks one protocol with the same flags at both ends."""
    for pair in c.pairs:
        s, d = pair.src.device, pair.dst.device
        if s.protocol != d.protocol or s.flags != d.flags:
            raise MigrationFailed(f"{pair.name}: source {s.protocol} flags {s.flags:#x} "
                                  f"but destination {d.protocol} flags {d.flags:#x}")


async def prepare_resume(c: Controller) -> None:
    """Destination: every device reset, stopped and RESUMING before the
    stream arrives."""
    for end in c.dst.devices:
        await c.walker.reset(end)
    await c.walker.walk_all(c.dst, lambda end: MigState.STOP)
    await c.walker.walk_all(c.dst, lambda end: MigState.RESUMING)


async def save(c: Controller, running: bool) -> None:
    """Source: seed 000's save flow, to QEMU's ``completed``."""
    src = c.src
    # RUNNING, DIRTY_TRACKING: the devices' DMA is logged from here on.
    for end in src.devices:
        await c.walker.call(end, end.device.client.dma_logging_start(PAGE_SIZE, [(0, src.ram.size)]),
                            "DMA_LOGGING_START")
    # The destination's devices are RESUMING before QEMU starts (resetting
    # one takes long enough for QEMU's first pass to end unwatched); under
    # libvirt they exist only once it has started, QEMU held meanwhile.
    if c.manager.dst_ready:
        await prepare_resume(c)
    c.run.incoming = True
    c.note("incoming")
    started = src.updates
    await c.manager.start(c)
    if not c.manager.dst_ready:
        check_pairs(c)
        await prepare_resume(c)
    await src.status(*PRECOPY, since=started)
    # SAVING|RUNNING (PRE_COPY), where the lifecycle table says so.
    await c.walker.walk_all(src, c.lifecycle_target)

    if running:
        c.enter("precopy")
        await precopy.converge(c)
        # SAVING|NDMA|RUNNING on every device, page requests drained, then
        # the vCPUs stop.
        c.enter("grace")
        await precopy.grace(c)

    # SAVING|!RUNNING (STOP_COPY) at pre-switchover: the rest of each
    # stream to its end, the last DMA log, then QEMU finishes.
    # Where the manager answers pre-switchover itself (libvirt), QEMU is
    # released only once every stream has ended.
    c.enter("stop-copy")
    ours = c.manager.answers_pre_switchover
    if c.run.held and ours:             # the vCPUs stopped with QEMU still held
        await _release_held(c)
    if ours:
        await src.status("pre-switchover")
    await c.walker.walk_all(src, c.lifecycle_target)
    await precopy.drain_page_requests(c)
    early = "early-release" in c.options.debug
    if early:
        await _let_switch_over(c)
        await src.wait(lambda s: s.status == "completed", "QEMU past its switchover")
    await asyncio.gather(*(_end_of_stream(c, pair) for pair in c.pairs))
    if not early:
        await _let_switch_over(c)

    c.enter("switchover")
    await src.status("completed")
    if not ours:
        # The source is the manager's to end now: its guest goes forward.
        c.run.committed = True
        with contextlib.suppress(QmpmigError):
            c.run.qemu_downtime = (await c.src.qemu.query_migrate()).downtime
    await c.dst.status("completed")


async def _let_switch_over(c: Controller) -> None:
    """QEMU may switch over now: qmpmig continues it at pre-switchover, or,
    where its manager answers that itself (libvirt), it is released."""
    if c.manager.answers_pre_switchover:
        await c.manager.continue_switchover(c)
    elif c.run.held:
        await _release_held(c)


async def _release_held(c: Controller) -> None:
    """QEMU gets its bandwidth back, with the budget as its downtime-limit."""
    c.run.held = False
    await c.manager.set_parameters(c, c.run.release)


async def _end_of_stream(c: Controller, pair: Pair) -> None:
    """One device in STOP_COPY: the rest of its stream, its state hash, its
    last DMA log (every device at once: this is inside the guest's pause)."""
    await c.pump.move(pair)
    c.trace.emit("end_of_stream", side="src", device=pair.name, bytes=pair.sent)
    pair.src_hash = await c.pump.state_hash(pair, pair.src)
    await c.pump.dma_report(pair)


async def _loaded_hash(c: Controller, pair: Pair) -> None:
    pair.dst_hash = await c.pump.state_hash(pair, pair.dst) or await c.pump.region_hash(pair, pair.dst)


async def resume(c: Controller, running: bool) -> None:
    """Destination, after QEMU's RAM load: the DMA-dirty pages, then every
    device out of RESUMING, through the grace state together, and ``cont``."""
    dst = c.dst
    c.enter("resume")
    await ready_ram(c)
    # !RESUMING: each device loads and validates what it was given.
    await c.walker.walk_all(dst, lambda end: MigState.STOP)
    c.note("loaded")
    c.run.committed = True
    if "scribble-after-load" in c.options.debug:
        for end, index in itertools.product(dst.devices, c.options.compare_regions):
            await c.walker.call(end, end.device.client.region_write(index, 0, b"\xa5" * 8), "a scribble")
    await asyncio.gather(*(_loaded_hash(c, pair) for pair in c.pairs))
    if not running:
        return
    if "early-barrier" in c.options.debug and len(dst.devices) > 1:
        await c.walker.walk(dst.devices[0], MigState.RUNNING)
    # NDMA|RUNNING (RUNNING_P2P) on every device, then RUNNING, then the vCPUs.
    target = {end: grace_target(end) for end in dst.devices}
    barrier = MigState.RUNNING_P2P if MigState.RUNNING_P2P in target.values() else None
    await c.walker.walk_all(dst, lambda end: target[end], barrier=barrier)
    await c.walker.walk_all(dst, lambda end: MigState.RUNNING)
    if dst.gone or not dst.qemu.connected:
        # Never started: the source, paused, is still the guest's one copy.
        raise MigrationFailed(f"the destination died before its vCPUs were started: {dst.gone or 'monitor lost'}")
    c.run.dst_started = True
    await c.manager.resume_destination(c)
    await dst.wait(lambda s: s.runstate == "running", "destination running")
    c.walker.resumed()
    c.run.downtime = await _pause(c)


async def ready_ram(c: Controller) -> None:
    """The destination's guest RAM made whole, once: what the source devices
    wrote by DMA, which QEMU could not see, copied over; then, with
    --verify-ram, compared with the source's."""
    if c.run.ram_ready:
        return
    c.run.copied = 0
    if "no-dirty-copy" not in c.options.debug:
        pages = set().union(*(pair.dirty for pair in c.pairs))
        c.run.copied = await c.dst.receive_pages(c.src.ram, pages)
        c.trace.emit("dirty_copy", pages=c.run.copied, bytes=c.run.copied * PAGE_SIZE)
    if c.options.verify_ram:
        await verify_ram(c)
    c.run.ram_ready = True


async def verify_ram(c: Controller) -> None:
    """The destination's guest RAM, loaded and given the DMA-dirty pages,
    must equal the source's byte for byte (the source is stopped, the
    destination not yet run): a page QEMU's RAM migration lost fails the
    migration before anything runs there, so the guest stays on the source.
    Compared page by page on one host, by a CRC-32 per MiB across hosts.
    With --repair-ram what differs is copied from the source's RAM, final
    since its vCPUs and devices stopped, and compared again."""
    if "corrupt-dst-ram" in c.options.debug:
        page = c.dst.ram.size // PAGE_SIZE // 2
        c.dst.ram.mem[page * PAGE_SIZE] ^= 0xFF
    unit, differing = await _compare_ram(c)
    if differing and c.options.repair_ram:
        last = c.src.ram.size // PAGE_SIZE
        pages = [page for gpa in differing for page in range(gpa // PAGE_SIZE, min(last, (gpa + unit) // PAGE_SIZE))]
        copied = await c.dst.receive_pages(c.src.ram, pages)
        c.run.repaired = len(differing) * unit
        c.trace.emit("ram_repair", units=len(differing), unit=unit, pages=copied)
        log.warning("guest RAM repaired at the destination: %d unit(s) of %d bytes differed", len(differing), unit)
        unit, differing = await _compare_ram(c)
    if differing:
        raise MigrationFailed(
            f"the destination's guest RAM differs from the source's after QEMU's RAM load: "
            f"{len(differing)} unit(s) of {unit} bytes, the first at GPA {differing[0]:#x} (QEMU before 9.0 "
            f"under TCG loses guest stores: docs/known-problems.md)")


async def _compare_ram(c: Controller) -> tuple[int, list[int]]:
    unit, differing = await c.dst.differing(c.src.ram)
    c.trace.emit("ram_verify", bytes=c.src.ram.size, unit=unit, differing=len(differing),
                 first_gpa=differing[0] if differing else None)
    return unit, differing


async def _pause(c: Controller) -> float | None:
    """The guest's pause by QEMU's own clocks: the source's STOP event to
    the destination's RESUME event (their monitors may deliver the events a
    little after the state is seen: up to a second is waited for)."""
    stop = c.src.event_times.get("STOP")
    for _ in range(100):
        resume = c.dst.event_times.get("RESUME")
        if stop is not None and resume is not None and resume >= stop:
            return resume - stop
        await asyncio.sleep(0.01)
    log.warning("no STOP and RESUME events to measure the pause by")
    return None


async def finish_save(c: Controller) -> None:
    """Source, once the destination has the guest: devices STOP, logging
    off, QEMU's settings as they were."""
    await c.walker.walk_all(c.src, lambda end: MigState.STOP)
    for pair in c.pairs:
        if pair.src_hash is None:
            with contextlib.suppress(OSError, MigrationFailed):
                pair.src_hash = await c.pump.region_hash(pair, pair.src)
    for end in c.src.devices:
        with contextlib.suppress(OSError):
            await end.device.client.dma_logging_stop()
    for problem in await precopy.restore_settings(c):
        log.warning("%s", problem)
