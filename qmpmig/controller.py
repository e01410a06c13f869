"""The controller: a live migration of a QEMU guest with its vfio-user
devices, in the order seed 000's reference flows demand.

Save (source), one attempt::

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

Every step goes through :func:`qmpmig.fsm.plan` one arc at a time, and into
the trace.  A failure anywhere cancels: the source guest and its devices
run on, the destination devices are reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from . import fsm, lifecycle
from .devices import Device
from .errors import QemuGone, QmpmigError
from .guestmem import PAGE, GuestRam
from .qemu import Qemu, VmState
from .states import MigState
from .trace import GRACE, Trace, past_grace
from .vfio_user import wire

log = logging.getLogger("qmpmig.controller")

#: Debug options that break one rule on purpose, for negative controls.
DEBUG = {
    "no-dirty-copy": "skip copying DMA-dirty pages to the destination",
    "stop-before-ndma": "stop the source vCPUs before the grace state",
    "early-barrier": "let one destination device run before the others reached RUNNING_P2P",
    "no-hold": "leave QEMU's downtime-limit alone during pre-copy, so QEMU may switch over by itself",
}


#: How the controller holds QEMU's switchover while devices pre-copy.  QEMU
#: switches over whenever what it has left, after a dirty-bitmap sync, is
#: under bandwidth x downtime-limit; no setting stops that once its first
#: RAM pass is done and the guest happens to dirty little (with
#: downtime-limit 0, QEMU 7.2 does not even sync again: it switches over right
#: after the first pass).  So the hold keeps the first pass from ending:
#: max-bandwidth is held low until every device has converged and reached
#: the grace state; then QEMU gets its bandwidth back.
HOLD_BANDWIDTH = 4 << 20
#: The grace state next to a device's state: save side from PRE_COPY (or
#: RUNNING, without pre-copy), resume side from STOP on the way to RUNNING.
GRACE_OF = {MigState.PRE_COPY: MigState.PRE_COPY_P2P, MigState.RUNNING: MigState.RUNNING_P2P,
            MigState.STOP: MigState.RUNNING_P2P}
#: Bytes a device may move per pre-copy round before convergence is looked at again.
PRECOPY_ROUND = 64 << 20
#: Seconds any one recovery step may take before it is given up.
RECOVER_TIMEOUT = 15.0
HOLD_DOWNTIME_MS = 1


class MigrationFailed(QmpmigError):
    """The migration did not complete; the message says what happened."""


class EarlySwitchover(MigrationFailed):
    """QEMU stopped the vCPUs and switched over before the grace state."""


@dataclass
class Pair:
    """A device on the source and its counterpart on the destination."""

    name: str
    src: Device
    dst: Device
    dirty: set[int] = field(default_factory=set)
    sent: int = 0
    outstanding: int = 0
    #: QMPMIG_STATE_HASH of the source at the end of its stream and of the
    #: destination once it left RESUMING (None where the device has none).
    src_hash: bytes | None = None
    dst_hash: bytes | None = None


@dataclass
class Options:
    #: Go to the grace state once every device has at most this much pending.
    threshold: int = 1 << 20
    #: ... and QEMU has at most this much RAM left.
    ram_threshold: int = 16 << 20
    min_precopy: float = 0.5
    max_precopy: float = 60.0
    #: downtime-limit (ms) QEMU gets once the vCPUs are stopped.
    downtime_limit: int = 300
    page_request_timeout: float = 10.0
    #: Seconds one device request may take in the flow.
    device_timeout: float = 30.0
    timeout: float = 300.0
    #: Attempts when QEMU switches over early (each needs a fresh destination).
    attempts: int = 3
    debug: frozenset[str] = frozenset()


@dataclass
class Summary:
    ok: bool
    message: str
    total_time: float = 0.0
    downtime: float | None = None
    qemu_downtime_ms: int | None = None
    device_bytes: int = 0
    dma_pages_copied: int = 0
    phases: dict[str, float] = field(default_factory=dict)


class Controller:
    """Drives one migration between two attached QEMUs and their devices."""

    def __init__(self, src: Qemu, dst: Qemu, pairs: list[Pair], uri: str,
                 src_ram: GuestRam, dst_ram: GuestRam, trace: Trace, options: Options | None = None):
        self.qemu = {"src": src, "dst": dst}
        self.pairs = pairs
        self.uri = uri
        self.ram = {"src": src_ram, "dst": dst_ram}
        self.trace = trace
        self.options = options or Options()
        self.vm: dict[str, VmState | None] = {"src": None, "dst": None}
        self.gone: dict[str, str | None] = {"src": None, "dst": None}
        #: How many (runstate, status) changes each side has reported.
        self.updates = {"src": 0, "dst": 0}
        self.known: dict[tuple[str, str], MigState] = {}
        self._changed = asyncio.Condition()
        self._vcpus = {"src": asyncio.Event(), "dst": asyncio.Event()}
        self.phase = "attach"
        self._phase_t = time.monotonic()
        self.phases: dict[str, float] = {}
        self.we_stopped = False
        self._release: dict = {}
        self._stopped_at = 0.0
        self.downtime: float | None = None
        self.copied = 0
        #: Called with the controller on each pre-copy round (progress line).
        self.progress = None
        #: async () -> (Qemu, GuestRam): a fresh destination for a retry.
        self.restart_destination = None
        self._follows: dict[str, list[asyncio.Task]] = {"src": [], "dst": []}

    # -- attach and follow --------------------------------------------------

    async def attach(self) -> None:
        """Follow both QEMUs, map guest RAM into every device, answer page requests."""
        for side in ("src", "dst"):
            self._start_following(side)
        for pair in self.pairs:
            for side, dev in (("src", pair.src), ("dst", pair.dst)):
                dev.client.on_page_request = self._page_request_handler(side, pair)
                self.known[side, pair.name] = await dev.state()
            await pair.dst.client.dma_map(0, self.ram["dst"].size, self.ram["dst"].dup_fd())
            await pair.src.client.dma_map(0, self.ram["src"].size, self.ram["src"].dup_fd())
        self.trace.emit("start", devices=[
            {"name": p.name, "side": side, "protocol": dev.protocol, "flags": int(dev.flags)}
            for p in self.pairs for side, dev in (("src", p.src), ("dst", p.dst))])
        for side in ("src", "dst"):
            await self.wait_vm(side, lambda s: True, "its first status", timeout=30)

    def _start_following(self, side: str) -> None:
        self._follows[side] = [asyncio.create_task(self._follow(side)),
                               asyncio.create_task(self._record_events(side))]

    async def _stop_following(self, side: str) -> None:
        for task in self._follows[side]:
            task.cancel()
        for task in self._follows[side]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def detach(self) -> None:
        for side in ("src", "dst"):
            await self._stop_following(side)

    async def _follow(self, side: str) -> None:
        try:
            async for state in self.qemu[side].states():
                self.trace.emit("vm_state", side=side, runstate=state.runstate, status=state.status)
                if state.runstate == "running":
                    self._vcpus[side].set()
                else:
                    self._vcpus[side].clear()
                async with self._changed:
                    self.vm[side] = state
                    self.updates[side] += 1
                    self._changed.notify_all()
        except QemuGone as err:
            async with self._changed:
                self.gone[side] = str(err)
                self._changed.notify_all()

    async def _record_events(self, side: str) -> None:
        with self.qemu[side].listener(()) as events:
            async for event in events:
                self.trace.emit("qmp_event", side=side, event=event["event"], data=event.get("data", {}))

    def _page_request_handler(self, side: str, pair: Pair):
        async def complete(request: wire.PageRequest) -> None:
            """Seed 000: only running vCPUs can complete an IO page fault."""
            pair.outstanding += 1
            self.trace.emit("page_request", side=side, device=pair.name, iova=request.iova)
            try:
                await self._vcpus[side].wait()
            finally:
                pair.outstanding -= 1
            self.trace.emit("page_complete", side=side, device=pair.name, iova=request.iova)
        return complete

    async def wait_vm(self, side: str, pred, what: str, timeout: float | None = None) -> VmState:
        """Wait until ``side``'s (runstate, status) satisfies ``pred``."""
        def ready():
            return self.gone[side] or (self.vm[side] and pred(self.vm[side]))
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout or self.options.timeout)
        except asyncio.TimeoutError:
            raise MigrationFailed(f"{side} QEMU: no {what} within {timeout or self.options.timeout:.0f} s "
                                  f"(at {self.vm[side]})") from None
        if self.gone[side]:
            raise MigrationFailed(f"{side} QEMU died ({self.gone[side]}) waiting for {what}")
        return self.vm[side]

    async def _status(self, side: str, *statuses: str, since: int = -1) -> VmState:
        """Wait for one of ``statuses``; a failure or cancel reported after
        update ``since`` ends the wait too, as a MigrationFailed."""
        def reached(state: VmState) -> bool:
            return state.status in statuses or (
                state.status in ("failed", "cancelled") and self.updates[side] > since)
        state = await self.wait_vm(side, reached, f"status {'/'.join(statuses)}")
        if state.status not in statuses:
            info = await self.qemu[side].query_migrate()
            raise MigrationFailed(f"{side} migration {state.status}: {info.error_desc or 'no reason given'}")
        return state

    # -- QMP and devices, traced ----------------------------------------------

    async def qmp(self, side: str, command: str, arguments: dict | None = None):
        self.trace.emit("qmp_command", side=side, command=command, arguments=arguments or {})
        try:
            return await self.qemu[side].execute(command, arguments)
        except QemuGone as err:
            raise MigrationFailed(f"{side} QEMU died during {command}: {err}") from err

    def enter(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[self.phase] = self.phases.get(self.phase, 0.0) + now - self._phase_t
        self.phase, self._phase_t = phase, now
        self.trace.emit("phase", name=phase)

    async def device(self, side: str, pair: Pair, call, what: str):
        """One request to a device, bounded: a device that stops answering
        fails the migration instead of hanging it."""
        try:
            return await asyncio.wait_for(call, self.options.device_timeout)
        except asyncio.TimeoutError:
            raise MigrationFailed(f"{side} device {pair.name} did not answer {what} "
                                  f"within {self.options.device_timeout:.0f} s") from None

    async def walk(self, side: str, pair: Pair, target: MigState) -> None:
        """Drive one device to ``target``, one FSM arc per SET, each traced."""
        dev = pair.src if side == "src" else pair.dst
        cur = self.known[side, pair.name]
        for step in fsm.plan(cur, target, dev.flags):
            try:
                await self.device(side, pair, dev.set_state(step), f"{cur.name} -> {step.name}")
            except OSError as err:
                self.trace.emit("device_error", side=side, device=pair.name, target=step,
                                errno=err.errno or 0, message=str(err))
                with contextlib.suppress(OSError):
                    self.known[side, pair.name] = await dev.state()
                raise MigrationFailed(f"{side} device {pair.name}: {cur.name} -> {step.name} failed: {err}") from err
            self.trace.emit("device_state", side=side, device=pair.name, **{"from": cur, "to": step})
            self.known[side, pair.name] = cur = step

    async def reset(self, side: str, pair: Pair) -> None:
        dev = pair.src if side == "src" else pair.dst
        await dev.reset()
        self.trace.emit("device_state", side=side, device=pair.name, via="reset",
                        **{"from": self.known.get((side, pair.name), MigState.ERROR), "to": MigState.RUNNING})
        self.known[side, pair.name] = MigState.RUNNING

    def _grace_on_the_way(self, side: str, pair: Pair, target: MigState) -> MigState | None:
        """The grace state a device would pass on its way to ``target``."""
        dev = pair.src if side == "src" else pair.dst
        path = fsm.plan(self.known[side, pair.name], target, dev.flags)
        for here, after in zip(path, path[1:]):
            if here in GRACE[side] and past_grace(side, after):
                return here
        return None

    async def walk_all(self, side: str, target_of, barrier: MigState | None = None) -> None:
        """Every device of a side to its target, concurrently; a barrier
        record when they all reached a grace state.  Where the way passes a
        grace state, every device reaches it before any goes past it (seed
        000; QEMU's vfio_vmstate_change_prepare does the same for a stop)."""
        targets = {p.name: target_of(p) for p in self.pairs}
        on_the_way = {p.name: g for p in self.pairs if (g := self._grace_on_the_way(side, p, targets[p.name]))}
        if on_the_way:
            await asyncio.gather(*(self.walk(side, p, on_the_way[p.name]) for p in self.pairs
                                   if p.name in on_the_way))
            self.trace.emit("barrier", side=side, state=next(iter(on_the_way.values())),
                            devices=sorted(on_the_way))
        await asyncio.gather(*(self.walk(side, p, targets[p.name]) for p in self.pairs))
        if barrier is not None:
            self.trace.emit("barrier", side=side, state=barrier,
                            devices=[p.name for p in self.pairs if self.known[side, p.name] is barrier])

    def lifecycle_target(self, side: str, pair: Pair) -> MigState:
        role = "source" if side == "src" else "destination"
        dev = pair.src if side == "src" else pair.dst
        state = self.vm[side]
        return lifecycle.target(role, state.runstate, state.status, dev.flags)

    def grace(self, side: str, pair: Pair) -> MigState:
        """Where a device waits out a grace state: the P2P state next to
        where it is; a device without P2P stays where it is (seed 000: the
        NDMA states are pushed down to the next step)."""
        cur = self.known[side, pair.name]
        twin = GRACE_OF.get(cur, cur)
        return twin if fsm.supports((pair.src if side == "src" else pair.dst).flags, twin) else cur

    # -- data ---------------------------------------------------------------

    async def move(self, pair: Pair, limit: int | None = None) -> int:
        """Source data to the destination device until none is available
        (or ``limit`` bytes moved: pre-copy comes back up for air)."""
        if self.known["src", pair.name] not in fsm.SAVING_GROUP:
            return 0
        moved = 0
        while (limit is None or moved < limit) and (
                data := await self.device("src", pair, pair.src.read_data(), "a data read")):
            await self.device("dst", pair, pair.dst.write_data(data), "a data write")
            moved += len(data)
        if moved:
            pair.sent += moved
            self.trace.emit("data", side="src", device=pair.name, bytes=moved)
        return moved

    async def dma_report(self, pair: Pair) -> None:
        """Read and clear a source device's DMA dirty log."""
        bitmap = await self.device("src", pair, pair.src.client.dma_logging_report(0, self.ram["src"].size, PAGE),
                                   "DMA_LOGGING_REPORT")
        pages = set(wire.bitmap_pages(bitmap))
        pair.dirty |= pages
        self.trace.emit("dma_dirty", side="src", device=pair.name, pages=len(pages))

    # -- the flows ----------------------------------------------------------

    async def migrate(self) -> Summary:
        t0 = time.monotonic()
        src_was_running = self.vm["src"].runstate == "running"
        attempt = 1
        while True:
            try:
                qemu_downtime = await self._save_and_resume(src_was_running, attempt)
                break
            except EarlySwitchover as err:
                recovered = await self._recover(src_was_running)
                if attempt >= self.options.attempts or self.restart_destination is None:
                    return self._failed(t0, f"{err}; {recovered}")
                self.trace.emit("phase", name="retry", reason=str(err))
                log.warning("%s: retrying with a fresh destination", err)
                await self._replace_destination()
                attempt += 1
            except (QmpmigError, OSError, ValueError, asyncio.CancelledError, KeyboardInterrupt) as err:
                interrupted = isinstance(err, (asyncio.CancelledError, KeyboardInterrupt))
                phase = self.phase
                recovered = await self._recover(src_was_running)
                summary = self._failed(t0, f"in {phase}: {'interrupted' if interrupted else err}; {recovered}")
                if interrupted:
                    raise
                return summary
        self.enter("done")
        summary = Summary(True, "migration completed" + (f" (attempt {attempt})" if attempt > 1 else ""),
                          time.monotonic() - t0, self.downtime, qemu_downtime,
                          sum(p.sent for p in self.pairs), self.copied, dict(self.phases))
        self.trace.emit("result", ok=True, message=summary.message)
        return summary

    def _failed(self, t0: float, what: str) -> Summary:
        message = f"migration failed {what}"
        self.trace.emit("result", ok=False, message=message)
        self.enter("failed")
        return Summary(False, message, time.monotonic() - t0, phases=dict(self.phases),
                       device_bytes=sum(p.sent for p in self.pairs))

    async def _replace_destination(self) -> None:
        """A fresh destination QEMU after an attempt QEMU cut short: the old
        one exits when its incoming migration fails."""
        await self._stop_following("dst")
        old_size = self.ram["dst"].size
        self.qemu["dst"], ram = await self.restart_destination()
        self.ram["dst"].close()
        self.ram["dst"] = ram
        self.vm["dst"], self.gone["dst"] = None, None
        self._start_following("dst")
        for pair in self.pairs:
            with contextlib.suppress(OSError):
                await pair.dst.client.dma_unmap(0, old_size)
            await pair.dst.client.dma_map(0, ram.size, ram.dup_fd())
            pair.dirty.clear()
        await self.wait_vm("dst", lambda s: True, "the new destination to report", timeout=30)

    async def _preflight(self) -> None:
        src, dst = self.vm["src"], self.vm["dst"]
        if (dst.runstate, dst.status) != ("inmigrate", "none"):
            raise MigrationFailed(f"destination is {dst}, not waiting with -incoming defer")
        if src.status not in ("none", "completed", "cancelled", "failed"):
            raise MigrationFailed(f"source is already migrating: {src}")
        caps = {c["capability"]: c["state"] for c in await self.qemu["src"].execute("query-migrate-capabilities")}
        if caps.get("postcopy-ram"):
            raise MigrationFailed("postcopy-ram is on: VFIO device migration has no postcopy (seed 002); "
                                  "nothing was started")
        for pair in self.pairs:
            if pair.src.protocol != pair.dst.protocol or pair.src.flags != pair.dst.flags:
                raise MigrationFailed(f"{pair.name}: source {pair.src.protocol} flags {pair.src.flags:#x} "
                                      f"but destination {pair.dst.protocol} flags {pair.dst.flags:#x}")

    async def _save_and_resume(self, src_was_running: bool, attempt: int) -> int | None:
        opts = self.options
        self.enter("setup")
        await self._preflight()
        self.we_stopped = False
        for pair in self.pairs:
            pair.sent = 0
        self.trace.emit("phase", name="attempt", attempt=attempt)
        await self.qmp("src", "migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}, {"capability": "pause-before-switchover", "state": True}]})
        await self.qmp("dst", "migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}]})
        params = await self.qemu["src"].execute("query-migrate-parameters")
        self._release = {"max-bandwidth": params.get("max-bandwidth", 128 << 20),
                         "downtime-limit": opts.downtime_limit}
        if "no-hold" not in opts.debug:
            await self.qmp("src", "migrate-set-parameters", {"downtime-limit": HOLD_DOWNTIME_MS,
                                                             "max-bandwidth": HOLD_BANDWIDTH})
        for pair in self.pairs:
            await pair.src.client.dma_logging_start(PAGE, [(0, self.ram["src"].size)])
        for pair in self.pairs:
            await self.reset("dst", pair)
        await self.walk_all("dst", lambda p: MigState.STOP)
        await self.walk_all("dst", lambda p: MigState.RESUMING)

        await self.qmp("dst", "migrate-incoming", {"uri": self.uri})
        started = self.updates["src"]
        await self.qmp("src", "migrate", {"uri": self.uri})
        await self._status("src", "setup", "active", "wait-unplug", since=started)
        await self.walk_all("src", lambda p: self.lifecycle_target("src", p))

        if src_was_running:
            self.enter("precopy")
            await self._precopy()
            self.enter("grace")
            await self._grace()
        self.enter("stop-copy")
        await self.qmp("src", "migrate-set-parameters", self._release)
        await self._status("src", "pre-switchover")
        await self.walk_all("src", lambda p: self.lifecycle_target("src", p))
        for pair in self.pairs:
            await self._drain_page_requests()
            await self.move(pair)
            self.trace.emit("end_of_stream", side="src", device=pair.name, bytes=pair.sent)
            pair.src_hash = await self._hash(pair.src)
            await self.dma_report(pair)
        await self.qmp("src", "migrate-continue", {"state": "pre-switchover"})

        self.enter("switchover")
        await self._status("src", "completed")
        await self._status("dst", "completed")
        info = await self.qemu["src"].query_migrate()

        self.enter("resume")
        self.copied = 0
        if "no-dirty-copy" not in opts.debug:
            pages = set().union(*(p.dirty for p in self.pairs))
            self.copied = self.ram["src"].copy_pages_to(self.ram["dst"], pages)
            self.trace.emit("dirty_copy", pages=self.copied, bytes=self.copied * PAGE)
        await self.walk_all("dst", lambda p: MigState.STOP)
        for pair in self.pairs:
            pair.dst_hash = await self._hash(pair.dst)
        if src_was_running:
            if "early-barrier" in opts.debug and len(self.pairs) > 1:
                await self.walk("dst", self.pairs[0], MigState.RUNNING)
            grace = {p.name: self.grace("dst", p) for p in self.pairs}
            await self.walk_all("dst", lambda p: grace[p.name],
                                barrier=MigState.RUNNING_P2P if MigState.RUNNING_P2P in grace.values() else None)
            await self.walk_all("dst", lambda p: MigState.RUNNING)
            await self.qmp("dst", "cont")
            await self.wait_vm("dst", lambda s: s.runstate == "running", "destination running")
            self.downtime = time.monotonic() - self._stopped_at
        await self.walk_all("src", lambda p: MigState.STOP)
        for pair in self.pairs:
            with contextlib.suppress(OSError):
                await pair.src.client.dma_logging_stop()
        return info.downtime

    async def _grace(self) -> None:
        """Every device to NDMA with the vCPUs running, every page request
        completed, and only then the vCPU stop."""
        if "stop-before-ndma" in self.options.debug:
            await self._stop_vcpus()
            for _ in range(200):  # let the devices run into a page request
                if any(p.outstanding for p in self.pairs):
                    break
                await asyncio.sleep(0.01)
        all_p2p = all(fsm.supports(p.src.flags, MigState.PRE_COPY_P2P) for p in self.pairs)
        await self.walk_all("src", lambda p: self.grace("src", p),
                            barrier=MigState.PRE_COPY_P2P if all_p2p else None)
        await self._drain_page_requests()
        if not self.we_stopped:
            await self._check_still_precopy()
            await self._ram_precopy()

    async def _ram_precopy(self) -> None:
        """Every device is in the grace state: release QEMU, let its RAM
        pre-copy converge while the devices stream what still changes, and
        stop the vCPUs once it has (unless QEMU stopped them itself, which
        is the reference flow's vCPU stop too now that every device is in
        NDMA)."""
        opts = self.options
        await self.qmp("src", "migrate-set-parameters", self._release)
        deadline = time.monotonic() + opts.max_precopy
        while True:
            await asyncio.gather(*(self.move(p, PRECOPY_ROUND) for p in self.pairs))
            state = self.vm["src"]
            if state.status in ("failed", "cancelled", "cancelling") or self.gone["src"] or self.gone["dst"]:
                await self._check_still_precopy()
            if state.runstate != "running":
                self._stopped_at = time.monotonic()
                return
            ram = (await self.qemu["src"].query_migrate()).ram_remaining
            if self.progress:
                self.progress(self, ram, [])
            if ram is not None and ram <= opts.ram_threshold or time.monotonic() > deadline:
                await self._drain_page_requests()
                await self._stop_vcpus()
                return
            await asyncio.sleep(0.02)

    async def _precopy(self) -> None:
        """Pre-copy until every device and QEMU's RAM have converged."""
        opts = self.options
        start = time.monotonic()
        while True:
            await asyncio.gather(*(self.move(p, PRECOPY_ROUND) for p in self.pairs))
            for pair in self.pairs:
                await self.dma_report(pair)
            await self._check_still_precopy()
            pending = [await p.src.pending() for p in self.pairs]
            ram = (await self.qemu["src"].query_migrate()).ram_remaining
            elapsed = time.monotonic() - start
            if self.progress:
                self.progress(self, ram, pending)
            if elapsed >= opts.min_precopy and max(pending, default=0) <= opts.threshold:
                return
            if elapsed > opts.max_precopy:
                log.warning("pre-copy did not converge in %.0f s (pending %s, RAM %s): going on",
                            elapsed, pending, ram)
                return
            await asyncio.sleep(0.1)

    async def _check_still_precopy(self) -> None:
        """Pre-copy goes on only while nothing ended it.  QEMU can switch
        over by itself when it finds nothing left to send: then its vCPUs
        stopped before our grace state."""
        state = self.vm["src"]
        if not self.gone["src"] and (state.status in ("failed", "cancelled", "cancelling")
                                     or self.gone["dst"]):
            # A cancel on the source ends the destination too: say the cause.
            info = await self.qemu["src"].query_migrate()
            if info.status in ("cancelling", "cancelled"):
                raise MigrationFailed("the migration was cancelled on the source (migrate_cancel)")
            if info.status == "failed":
                # The usual cause is the other end going away: give its
                # monitor's EOF a moment to arrive, to say so.
                with contextlib.suppress(asyncio.TimeoutError):
                    async with self._changed:
                        await asyncio.wait_for(self._changed.wait_for(lambda: self.gone["dst"]), 1.0)
                raise MigrationFailed(f"source migration failed: {info.error_desc or 'no reason given'}"
                                      + (f"; destination QEMU died: {self.gone['dst']}" if self.gone["dst"] else ""))
        if self.gone["src"]:
            raise MigrationFailed(f"source QEMU died: {self.gone['src']}")
        if self.gone["dst"]:
            raise MigrationFailed(f"destination QEMU died: {self.gone['dst']}")
        if state.runstate != "running" or state.status not in ("setup", "active", "wait-unplug"):
            raise EarlySwitchover(f"QEMU stopped the vCPUs and switched over by itself before the grace "
                                  f"state (source at {state})")

    async def _drain_page_requests(self) -> None:
        """Seed 000: every IO page request completes while the vCPUs run."""
        deadline = time.monotonic() + self.options.page_request_timeout
        while any(p.outstanding for p in self.pairs):
            if time.monotonic() > deadline:
                stuck = {p.name: p.outstanding for p in self.pairs if p.outstanding}
                raise MigrationFailed(f"IO page requests stuck with the vCPUs stopped: {stuck}")
            await asyncio.sleep(0.01)

    @staticmethod
    async def _hash(dev: Device) -> bytes | None:
        try:
            return await dev.state_hash()
        except OSError:
            return None

    async def _stop_vcpus(self) -> None:
        self._stopped_at = time.monotonic()
        self.we_stopped = True
        await self.qmp("src", "stop")

    # -- failure ------------------------------------------------------------

    async def _recover_source_device(self, pair: Pair, target: MigState) -> None:
        if self.known.get(("src", pair.name)) is MigState.ERROR:
            await self.reset("src", pair)
        await self.walk("src", pair, target)
        with contextlib.suppress(OSError):
            await pair.src.client.dma_logging_stop()

    async def _recover(self, src_was_running: bool) -> str:
        """Cancel; the source guest and its devices run on; the destination
        devices are reset.  Returns what the source looks like now."""
        self.enter("recover")
        notes = []
        if not self.gone["src"]:
            with contextlib.suppress(QmpmigError):
                await self.qmp("src", "migrate_cancel")
                await self.wait_vm("src", lambda s: s.status in ("cancelled", "failed", "completed", "none"),
                                   "the cancel to finish", timeout=30)
            if src_was_running and self.vm["src"] and self.vm["src"].runstate != "running":
                with contextlib.suppress(QmpmigError):
                    await self.qmp("src", "cont")
                    await self.wait_vm("src", lambda s: s.runstate == "running", "source running", timeout=10)
            notes.append(f"source VM {self.vm['src'].runstate if self.vm['src'] else 'unknown'}")
        else:
            notes.append(f"source QEMU gone: {self.gone['src']}")
        target = MigState.RUNNING if src_was_running else MigState.STOP
        for pair in self.pairs:
            try:
                await asyncio.wait_for(self._recover_source_device(pair, target), RECOVER_TIMEOUT)
                notes.append(f"{pair.name} {target.name}")
            except (QmpmigError, OSError, asyncio.TimeoutError) as err:
                notes.append(f"{pair.name} not recovered: {err or 'no answer'}")
            with contextlib.suppress(QmpmigError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self.reset("dst", pair), RECOVER_TIMEOUT)
        return ", ".join(notes)
