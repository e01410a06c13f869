"""The controller: two attached VMs, their device pairs, and migrations
between them as requests.

:class:`Controller` holds what lives as long as it is attached (each
:class:`~.side.Side`, each :class:`~.pump.Pair`); :meth:`Controller.migrate`
runs one migration with the flows of :mod:`.flows`, keeps
what that migration learns in a fresh :class:`Run`, and answers with a
:class:`Summary`.  A failure anywhere recovers the source (:mod:`.recovery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import MigrationFailed, QemuMigrationFailed, QmpmigError, reason
from ..migration import lifecycle
from ..migration.states import MigFlags, MigState
from . import flows, precopy
from .manager import Manager, QmpManager
from .pump import SPOIL, Pair, Pump
from .recovery import go_forward, recover
from .side import DeviceEnd, Side
from .trace import Trace, device_list
from .walk import Walker

log = logging.getLogger("qmpmig.controller")

#: Seconds of Options.max_pause kept for the recovery: migrate_cancel, its
#: end, and cont took up to 1.1 s under TCG on two cores.
PAUSE_MARGIN = 1.5

#: Debug options that break one rule on purpose, for negative controls.
DEBUG = {
    "no-dirty-copy": "skip copying DMA-dirty pages to the destination",
    "stop-before-ndma": "stop the source vCPUs before the grace state",
    "early-barrier": "let one destination device run before the others reached RUNNING_P2P",
    "corrupt-dst-ram": "flip a byte of the destination's guest RAM after QEMU's load, before --verify-ram "
                       "compares it",
    "early-release": "let QEMU switch over (migrate-continue, or under libvirt the release), and see it "
                     "complete, once the devices are in STOP_COPY but before their streams were read",
    "no-hold": "leave QEMU's downtime-limit alone during pre-copy, so QEMU may switch over by itself",
    "scribble-after-load": "overwrite the start of each compared region of the destination devices after "
                           "their load, so their state differs from the source's",
    **{f"spoil-{how}": f"{how} a piece of every device stream on its way to the destination (pump.SPOIL)"
       for how in SPOIL},
}


#: Extension, the devices that would use it, what goes unverified without it.
UNVERIFIED = (
    ("QMPMIG_STATE_HASH", lambda device: True,
     "the destination's device state was not compared with the source's"),
    ("QMPMIG_PRECOPY_INFO", lambda device: device.protocol == "v2" and device.flags & MigFlags.PRE_COPY,
     "pre-copy convergence was judged by the stream running dry"),
    ("MIG_DATA_SIZE", lambda device: device.protocol == "v2",
     "the stop-copy size was not known before reading it"),
)


@dataclass
class Options:
    #: Go to the grace state once every device has at most this much pending.
    threshold: int = 1 << 20
    min_precopy: float = 0.5
    max_precopy: float = 60.0
    #: The downtime budget (ms): the vCPUs stop once QEMU's RAM and the
    #: devices' data left fit it at this migration's rates.
    downtime_limit: int = 300
    #: How far the budget may be raised when pre-copy stalls (ms).
    max_downtime_limit: int = 2000
    page_request_timeout: float = 10.0
    #: Seconds one device request may take in the flow.
    device_timeout: float = 30.0
    timeout: float = 300.0
    #: Seconds the guest may stay paused after a device stops answering:
    #: once the vCPUs are stopped, each device request must end within this
    #: (less a margin for the recovery), or the source runs again.
    max_pause: float = 5.0
    #: The optional parts of the v2 protocol (MigFlags P2P, PRE_COPY) used
    #: with the devices, as far as they offer them.
    device_flags: int = int(MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY)
    #: Regions whose contents are compared, source at the stop against
    #: destination after the load, for devices without QMPMIG_STATE_HASH.
    compare_regions: tuple[int, ...] = ()
    #: Compare the destination's guest RAM with the source's, byte for
    #: byte, before the destination runs (both RAM files on this host; the
    #: time is inside the guest's pause: about 0.05 s per 256 MiB).
    verify_ram: bool = False
    #: With verify_ram: copy what differs from the source's RAM (stopped,
    #: final) and compare again, instead of failing (QEMU < 9.0 under TCG
    #: loses guest stores, and a libvirt domain's RAM cannot be padded).
    repair_ram: bool = False
    debug: frozenset[str] = frozenset()

    def as_request(self) -> dict:
        """The options as a daemon request carries them (JSON)."""
        fields = dict(self.__dict__)
        fields["debug"] = sorted(self.debug)
        fields["compare_regions"] = list(self.compare_regions)
        return fields


@dataclass
class Summary:
    ok: bool
    message: str
    total_time: float = 0.0
    #: The guest's pause: seconds from the source's STOP event to the
    #: destination's RESUME event, by QEMU's own event timestamps.
    downtime: float | None = None
    #: QEMU's own downtime (query-migrate), in milliseconds.
    qemu_downtime_ms: int | None = None
    device_bytes: int = 0
    dma_pages_copied: int = 0
    phases: dict[str, float] = field(default_factory=dict)
    #: Where the guest runs (or would, once started): ``source``,
    #: ``destination``, or ``nowhere`` (the source QEMU died before the
    #: destination had all of the guest: it is lost).
    guest_on: str = "source"
    #: What could not be verified, for want of an extension (one line each).
    unverified: list[str] = field(default_factory=list)
    #: The devices' I/O outage: seconds from the first source device's
    #: acknowledging a state without DMA to the last destination device's
    #: acknowledging RUNNING; and each pair's own.
    device_outage: float | None = None
    device_outages: dict[str, float] = field(default_factory=dict)
    #: Bytes of guest RAM that differed at the destination and --repair-ram copied.
    ram_repaired: int = 0

    def as_dict(self) -> dict:
        """The summary as ``qmpmig migrate --json`` prints it (seconds, rounded)."""
        return {"ok": self.ok, "message": self.message, "total_time_s": round(self.total_time, 3),
                "downtime_s": self.downtime and round(self.downtime, 3),
                "qemu_downtime_ms": self.qemu_downtime_ms, "device_bytes": self.device_bytes,
                "dma_pages_copied": self.dma_pages_copied,
                "phases_s": {k: round(v, 3) for k, v in self.phases.items()}, "guest_on": self.guest_on,
                "unverified": self.unverified,
                "device_outage_s": self.device_outage and round(self.device_outage, 3),
                "device_outages_s": {k: round(v, 3) for k, v in self.device_outages.items()},
                "ram_repaired": self.ram_repaired}

    @classmethod
    def from_dict(cls, d: dict) -> Summary:
        """The summary back from :meth:`as_dict` (a daemon's reply)."""
        return cls(d["ok"], d["message"], d["total_time_s"], d["downtime_s"], d["qemu_downtime_ms"],
                   d["device_bytes"], d["dma_pages_copied"], dict(d["phases_s"]), d["guest_on"],
                   list(d.get("unverified", ())), d.get("device_outage_s"), dict(d.get("device_outages_s", {})),
                   d.get("ram_repaired", 0))


@dataclass
class Run:
    """What one migration request learns on its way, set by the flows."""

    #: The phase under way; "idle" before the first and after the last.
    phase: str = "idle"
    #: Seconds spent in each phase so far.
    phases: dict[str, float] = field(default_factory=dict)
    phase_started: float = field(default_factory=time.monotonic)
    #: The controller stopped the source vCPUs (not QEMU by itself).
    we_stopped: bool = False
    #: The guest's pause by QEMU's event timestamps (Summary.downtime).
    downtime: float | None = None
    #: DMA-dirty pages copied to the destination guest.
    copied: int = 0
    #: QEMU's RAM left and each device's pending bytes, at the last
    #: pre-copy round (what a progress line shows).
    ram_remaining: int | None = None
    pending: list[int] = field(default_factory=list)
    #: QEMU's RAM rate, measured while it runs unheld.
    ram_rate: precopy.Rate = field(default_factory=precopy.Rate)
    #: QEMU's bandwidth is held near the end of its first pass.
    held: bool = False
    #: The downtime budget (ms): Options.downtime_limit, raised on a stall.
    budget: int = 0
    #: migrate-set-parameters that give QEMU back its switchover.
    release: dict = field(default_factory=dict)
    #: side -> the capabilities and parameters before the flow changed them.
    settings: dict[str, dict] = field(default_factory=dict)
    #: The destination was asked to listen (migrate-incoming): it holds, or
    #: may hold, a copy of the guest from then on.
    incoming: bool = False
    #: Every destination device loaded its state (or, under a manager that
    #: ends the source at QEMU's completion, QEMU completed): from here on
    #: the guest's place is the destination, and a failure goes forward,
    #: never back.
    committed: bool = False
    #: Whether the destination's vCPUs were ever asked to run (``cont``).
    dst_started: bool = False
    #: The destination's guest RAM has the DMA-dirty pages (and was verified).
    ram_ready: bool = False
    #: QEMU's own downtime (ms), once asked.
    qemu_downtime: int | None = None
    #: Bytes of guest RAM --repair-ram copied (the units that differed).
    repaired: int = 0


class Controller:
    """Drives a migration from one attached VM to another: their devices of
    the same name form the pairs."""

    def __init__(self, src: Side, dst: Side, uri: str, trace: Trace, options: Options | None = None,
                 manager: Manager | None = None):
        self.options = options or Options()
        self.trace = trace
        self.uri = uri
        #: Who drives QEMU's migration (:mod:`.manager`).
        self.manager = manager or QmpManager()
        self.src, self.dst = src, dst
        src.take_part("src", trace)
        dst.take_part("dst", trace)
        for end in src.devices:
            end.device.use_only(self.options.device_flags)
        self.pairs: list[Pair] = []
        if self.manager.dst_ready:
            self.pair_up()
        self.walker = Walker(self.options.device_timeout)
        spoil = next((name.removeprefix("spoil-") for name in self.options.debug if name.startswith("spoil-")), None)
        self.pump = Pump(self.walker, tuple(self.options.compare_regions), spoil)
        #: note(op, **fields): each step, before it is taken, for a journal.
        self.note: Callable[..., None] = lambda op, **fields: None
        #: The migration under way, or the last one.
        self.run = Run()

    def pair_up(self) -> None:
        """The source's and the destination's devices of the same name form
        the pairs (flows.check_pairs holds them to one protocol)."""
        theirs = {end.name: end for end in self.dst.devices}
        if set(theirs) != {end.name for end in self.src.devices}:
            raise MigrationFailed(f"the source has devices {sorted(end.name for end in self.src.devices)}, "
                                  f"the destination {sorted(theirs)}")
        for end in self.dst.devices:
            end.device.use_only(self.options.device_flags)
        self.pairs = [Pair(end.name, end, theirs[end.name]) for end in self.src.devices]

    def trace_devices(self, kind: str, sides: tuple[Side, ...]) -> None:
        """The devices of ``sides`` as the trace checker needs them."""
        self.trace.emit(kind, devices=device_list(end for side in sides for end in side.devices))

    @property
    def phase(self) -> str:
        return self.run.phase

    # -- helpers of the flows --------------------------------------------------

    def enter(self, phase: str) -> None:
        """A new phase of the flow: its time is counted, and traced."""
        run, now = self.run, time.monotonic()
        if run.phase != "idle":
            run.phases[run.phase] = run.phases.get(run.phase, 0.0) + now - run.phase_started
        run.phase, run.phase_started = phase, now
        self.note("phase", name=phase)
        self.trace.emit("phase", name=phase)

    def vcpus_stopped(self) -> None:
        """The guest is paused from now: device requests count against
        :attr:`Options.max_pause` until it runs again."""
        if self.walker.paused_timeout is not None:
            return
        self.walker.paused(max(0.5, self.options.max_pause - PAUSE_MARGIN))

    async def _notice_vcpu_stop(self) -> None:
        """QEMU may stop the source vCPUs itself (at pre-switchover, once
        its RAM converged) while a device request is under way: the guest
        is paused from then on, whoever noticed it first."""
        with contextlib.suppress(MigrationFailed):
            await self.src.wait(lambda s: s.runstate != "running", "a vCPU stop", timeout=self.options.timeout)
            if self.run.phase not in ("recover", "done", "failed"):
                self.vcpus_stopped()

    def lifecycle_target(self, end: DeviceEnd) -> MigState:
        """The device_state the lifecycle table gives for its VM's state now."""
        vm = end.side.vm
        return lifecycle.target(end.side.role, vm.runstate, vm.status, end.device.flags)

    # -- a migration ----------------------------------------------------------

    async def migrate(self) -> Summary:
        """One migration: the source survives any failure before every
        destination device loaded its state; after that it goes forward."""
        t0 = time.monotonic()
        self.run = Run()
        self.trace_devices("start", (self.src, self.dst) if self.pairs else (self.src,))
        running = self.src.vm.runstate == "running"
        noticing = asyncio.create_task(self._notice_vcpu_stop()) if running else None
        try:
            qemu_downtime = await flows.migrate(self, running)
        except (Exception, asyncio.CancelledError, KeyboardInterrupt) as err:
            interrupted = isinstance(err, (asyncio.CancelledError, KeyboardInterrupt))
            if not interrupted and not isinstance(err, (QmpmigError, OSError, ValueError)):
                log.exception("migration flow failed")
            phase, committed = self.phase, self.run.committed
            what = "interrupted" if interrupted else reason(err)
            if isinstance(err, QemuMigrationFailed):
                # The usual cause is the other end going away: its monitor's
                # EOF may be a moment behind, to say so.
                await self.dst.wait_gone(1.0)
            for side in (self.src, self.dst):
                if not side.gone and not side.qemu.connected:
                    await side.wait_gone(1.0)   # a lost monitor: its watcher says why in a moment
            for side, who in ((self.dst, "destination"), (self.src, "source")):
                if side.gone and side.gone not in what:
                    what += f" (the {who} {side.lost}: {side.gone})"
            if committed and self.dst.gone and not self.run.dst_started and self.manager.answers_pre_switchover:
                # The destination died with its copy never run: the source,
                # paused with its RAM and its devices stopped, not reset, is
                # the one copy left, and nothing has diverged from it.
                committed = False
                what += ": the guest goes back to the source (the destination never ran it)"
            lost = self.dst.gone and self.dst.dies_when_gone if committed else self.src.gone
            if lost and committed:
                what += ": the guest is lost (its place was the destination, whose QEMU died)"
            elif lost:
                what += ": the guest is lost (it ran only at the source, and the destination did not have all of it)"
            recovered = await (go_forward(self, running) if committed else recover(self, running))
            with contextlib.suppress(QmpmigError):
                await self.manager.done(self)
            summary = self._failed(t0, f"in {phase}: {what}; {recovered}")
            summary.guest_on = "nowhere" if lost else "destination" if committed else "source"
            if interrupted:
                raise
            return summary
        finally:
            if noticing:                # idle once recovery or the end has begun
                noticing.cancel()
        self.enter("done")
        summary = Summary(True, "migration completed", time.monotonic() - t0, self.run.downtime, qemu_downtime,
                          sum(p.sent for p in self.pairs), self.run.copied, dict(self.run.phases),
                          guest_on="destination", unverified=self.unverified(), ram_repaired=self.run.repaired)
        self.outage(summary)
        self.trace.emit("result", ok=True, message=summary.message)
        return summary

    def unverified(self) -> list[str]:
        """What this migration could not verify, device by device, for want
        of an extension the device does not offer."""
        notes = []
        for pair in self.pairs:
            device = pair.src.device
            missing = [f"{meaning} (no {extension})" for extension, uses, meaning in UNVERIFIED
                       if uses(device) and extension not in device.extensions
                       and not (extension == "QMPMIG_STATE_HASH" and pair.compared)]
            if missing:
                notes.append(f"{pair.name}: " + "; ".join(missing))
        return notes

    def outage(self, summary: Summary) -> None:
        """The devices' I/O outage, from the ends the walker noted."""
        off = {p.name: p.src.dma_off_at for p in self.pairs if p.src.dma_off_at is not None}
        on = {p.name: p.dst.running_at for p in self.pairs if p.dst.running_at is not None}
        if off and on:
            summary.device_outage = max(on.values()) - min(off.values())
            summary.device_outages = {name: on[name] - off[name] for name in off if name in on}

    def progress(self, ram_remaining: int | None, pending: list[int]) -> None:
        """A pre-copy round's figures, for whoever watches the migration."""
        self.run.ram_remaining, self.run.pending = ram_remaining, pending

    def _failed(self, t0: float, what: str) -> Summary:
        message = f"migration failed {what}"
        self.trace.emit("result", ok=False, message=message)
        self.enter("failed")
        return Summary(False, message, time.monotonic() - t0, phases=dict(self.run.phases),
                       device_bytes=sum(p.sent for p in self.pairs))

