"""libvirt as the manager of a migration qmpmig drives
(``qmpmig migrate --libvirt``; the design, on libvirt 9.0's facts, is
docs/libvirt-flow.md).

libvirt owns QEMU's monitor and the migration: qmpmig starts it with
``virDomainMigrateToURI3`` (peer to peer, live, ``VIR_MIGRATE_PAUSED`` so
that the destination waits for its devices), holds and releases QEMU with
``virDomainMigrateSetMaxSpeed`` and ``virDomainMigrateSetMaxDowntime``,
stops the vCPUs with ``virDomainSuspend`` and cancels with
``virDomainAbortJob``.  The destination is resumed by its own host's
daemon through its own libvirt (``incoming_resume``).  The domain's second
QMP monitor watches (QEMU's run state, migration status, events and
``query-migrate``) and does one thing libvirt's API cannot: hold QEMU below
1 MiB/s while the devices' stop-copy runs (:data:`STOP_HOLD_BANDWIDTH`).

Each libvirt call is traced as a ``libvirt_call`` record naming the QMP
command libvirt sends for it, so that the trace checker holds it to the
rule that command is held to.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from ..errors import MigrationFailed, QmpmigError, reason
from ..qemu.qmp import PRECOPY
from .api import Libvirt, module
from .domain import with_migration

if TYPE_CHECKING:
    from ..controller.core import Controller
    from ..controller.peerside import PeerSide
    from ..controller.side import Side

#: Seconds the destination's daemon has to be handed the domain by its
#: hook once libvirt started it there.
ARRIVAL_TIMEOUT = 60.0
#: Seconds libvirt may take to end its migration job after QEMU's migration ended.
JOB_TIMEOUT = 60.0
#: Seconds libvirt has to resume the source of a failed migration itself.
RESTORE_TIMEOUT = 10.0
#: QEMU's bandwidth as libvirt starts it (MiB/s, its least), until the
#: trickle hold takes over.
START_BANDWIDTH = 1
#: QEMU's bandwidth from the vCPU stop to the end of the devices' streams
#: (bytes/s): about ten pages a second (QEMU's rate limit allows a tenth
#: per 100 ms and sends at least a page), and zero pages held as well,
#: which libvirt's whole MiB/s cannot do (1 MiB/s lets 25 pages and some
#: 13,000 zero pages through per 100 ms).
STOP_HOLD_BANDWIDTH = 1024


def _mib(nbytes: int) -> int:
    """Bytes per second as libvirt's whole MiB/s, rounded up, at least 1."""
    return max(1, -(-int(nbytes) // (1 << 20)))


class LibvirtManager:
    """One migration of one domain, driven through its host's libvirt."""

    answers_pre_switchover = False
    dst_ready = False

    def __init__(self, libvirt: Libvirt, domain: str, dest_uri: str, migration: str,
                 migrate_uri: str | None = None):
        self.lv, self.domain = libvirt, domain
        #: The destination libvirt (peer to peer: the source's libvirtd dials it).
        self.dest_uri = dest_uri
        self.migration = migration
        #: Where QEMU's migration stream goes (default: libvirt's choice).
        self.migrate_uri = migrate_uri
        #: virDomainMigrateToURI3, running in its thread until libvirt's job ends.
        self.job: asyncio.Task | None = None

    async def _call(self, c: Controller, side: str, call: str, qmp: str, fn, *args, **arguments):
        c.trace.emit("libvirt_call", side=side, call=call, qmp=qmp, arguments=arguments)
        return await self.lv.call(call, fn, *args)

    async def settings(self, c: Controller) -> dict[str, dict]:
        """libvirt's migration speed and downtime for the domain (libvirt
        turns on QEMU's events and pause-before-switchover itself)."""
        dom = await self.lv.domain(self.domain)
        speed = await self.lv.call("virDomainMigrateGetMaxSpeed", dom.migrateGetMaxSpeed, 0)
        downtime = await self.lv.call("virDomainMigrateGetMaxDowntime", dom.migrateGetMaxDowntime, 0)
        return {"src": {"parameters": {"max-bandwidth": speed << 20, "downtime-limit": downtime}}, "dst": {}}

    async def enable(self, c: Controller) -> None:
        """Nothing: libvirt turns on what it needs itself."""

    async def put_back(self, side: Side, saved: dict) -> None:
        """libvirt's settings as they were, on a domain still running here."""
        if "parameters" not in saved:
            return
        dom = await self.lv.domain(self.domain)
        if await self.lv.call("virDomainIsActive", dom.isActive):
            params = saved["parameters"]
            await self.lv.call("virDomainMigrateSetMaxSpeed", dom.migrateSetMaxSpeed,
                               _mib(params["max-bandwidth"]), 0)
            await self.lv.call("virDomainMigrateSetMaxDowntime", dom.migrateSetMaxDowntime,
                               params["downtime-limit"], 0)

    async def set_parameters(self, c: Controller, parameters: dict) -> None:
        dom = await self.lv.domain(self.domain)
        if "max-bandwidth" in parameters:
            mib = _mib(parameters["max-bandwidth"])
            await self._call(c, "src", "virDomainMigrateSetMaxSpeed", "migrate-set-parameters",
                             dom.migrateSetMaxSpeed, mib, 0, bandwidth_mib=mib)
        if "downtime-limit" in parameters:
            ms = int(parameters["downtime-limit"])
            await self._call(c, "src", "virDomainMigrateSetMaxDowntime", "migrate-set-parameters",
                             dom.migrateSetMaxDowntime, ms, 0, downtime_ms=ms)

    async def start(self, c: Controller) -> None:
        """libvirt's peer-to-peer migration, in a thread, with the domain's
        XML for the destination carrying this migration's id, QEMU held
        until the destination's devices are there; then those devices,
        through the destination's daemon once its hook handed it the
        domain."""
        lv = module()
        dom = await self.lv.domain(self.domain)
        xml = await self.lv.call("virDomainGetXMLDesc", dom.XMLDesc, lv.VIR_DOMAIN_XML_MIGRATABLE)
        params = {lv.VIR_MIGRATE_PARAM_DEST_XML: with_migration(xml, self.migration),
                  lv.VIR_MIGRATE_PARAM_BANDWIDTH: START_BANDWIDTH}
        if self.migrate_uri:
            params[lv.VIR_MIGRATE_PARAM_URI] = self.migrate_uri
        flags = lv.VIR_MIGRATE_LIVE | lv.VIR_MIGRATE_PEER2PEER | lv.VIR_MIGRATE_PAUSED
        conn = await self.lv.open()
        try:
            own = await self.lv.call(f"domain {self.domain}", conn.lookupByName, self.domain)
        except BaseException:
            await asyncio.to_thread(conn.close)
            raise
        c.trace.emit("libvirt_call", side="src", call="virDomainMigrateToURI3", qmp="migrate",
                     arguments={"dconnuri": self.dest_uri, "flags": ["LIVE", "PEER2PEER", "PAUSED"],
                                "bandwidth_mib": START_BANDWIDTH, "uri": self.migrate_uri})
        c.run.held = True
        seen = c.src.updates

        async def migrate() -> None:
            try:
                await self.lv.call("virDomainMigrateToURI3", own.migrateToURI3, self.dest_uri, params, flags)
            finally:
                with contextlib.suppress(lv.libvirtError):
                    await asyncio.to_thread(conn.close)
        self.job = asyncio.create_task(migrate())
        dst: PeerSide = c.dst
        arriving = asyncio.create_task(self._arrive(c, dst, seen))
        try:
            await asyncio.wait({arriving, self.job}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not arriving.done():
                arriving.cancel()
                with contextlib.suppress(BaseException):
                    await arriving
        if arriving.cancelled() or arriving.exception() and self.job.done():
            raise MigrationFailed(f"libvirt's migration ended before the destination's daemon had the domain: "
                                  f"{self._job_error() or 'no error given'}")
        arriving.result()
        c.pair_up()
        c.trace_devices("paired", (c.dst,))

    async def _arrive(self, c: Controller, dst: PeerSide, seen: int) -> None:
        """QEMU held to a trickle as soon as it migrates (libvirt's slowest,
        1 MiB/s, lets zero pages through by the hundred MiB/s: the pass
        could end, and QEMU switch over, before the devices are there);
        then the destination, once its hook handed it to its daemon."""
        await c.src.wait(lambda s: c.src.updates > seen and s.status in PRECOPY, "libvirt's migration to start",
                         timeout=ARRIVAL_TIMEOUT)
        await self.hold_for_stop(c)
        await dst.arrive(ARRIVAL_TIMEOUT)

    def _job_error(self) -> str | None:
        if self.job and self.job.done() and not self.job.cancelled() and self.job.exception():
            return reason(self.job.exception())
        return None

    async def hold_for_stop(self, c: Controller) -> None:
        """QEMU down to a trickle (before the vCPUs stop, and while the
        destination's devices are not there), over the domain's second
        monitor: libvirt has no API for a bandwidth below 1 MiB/s.  The
        release (virDomainMigrateSetMaxSpeed) takes it back."""
        await c.src.qmp("migrate-set-parameters", {"max-bandwidth": STOP_HOLD_BANDWIDTH})

    async def stop(self, c: Controller) -> None:
        dom = await self.lv.domain(self.domain)
        await self._call(c, "src", "virDomainSuspend", "stop", dom.suspend)
        # libvirt's monitor had QEMU's answer; this one has the STOP event
        # to come, and the flow's next step reads the run state.
        await c.src.wait(lambda s: s.runstate != "running", "the vCPU stop virDomainSuspend asked for", timeout=10)

    async def continue_switchover(self, c: Controller) -> None:
        raise AssertionError("libvirt answers pre-switchover itself")

    async def resume_destination(self, c: Controller) -> None:
        """The destination host's daemon resumes the domain through its own
        libvirt (a daemon may call its host's libvirt; a hook may not)."""
        c.trace.emit("libvirt_call", side="dst", call="virDomainResume", qmp="cont", arguments={})
        dst: PeerSide = c.dst
        await dst.resume()

    async def cancel(self, c: Controller) -> None:
        """virDomainAbortJob, and libvirt's job seen to its end: libvirt then
        puts back what it changed and resumes the source it had paused
        (qemuMigrationSrcRestoreDomainState)."""
        if self.job is None or self.job.done():
            return
        dom = await self.lv.domain(self.domain)
        with contextlib.suppress(QmpmigError):
            await self._call(c, "src", "virDomainAbortJob", "migrate_cancel", dom.abortJob)
        with contextlib.suppress(QmpmigError, asyncio.TimeoutError):
            await self.done(c)

    async def resume_source(self, c: Controller) -> None:
        """libvirt resumes the source of a failed migration itself; only if
        it has not within RESTORE_TIMEOUT is it asked to."""
        with contextlib.suppress(MigrationFailed):
            await c.src.wait(lambda s: s.runstate == "running", "libvirt resuming the source",
                             timeout=RESTORE_TIMEOUT)
            return
        dom = await self.lv.domain(self.domain)
        await self._call(c, "src", "virDomainResume", "cont", dom.resume)

    async def end_destination(self, c: Controller, timeout: float) -> None:
        """libvirt ends the destination QEMU of a failed incoming migration
        itself; it must be seen gone."""
        if c.dst.vm is None:
            return                      # never got there
        if not await c.dst.wait_gone(timeout):
            raise MigrationFailed(f"the destination QEMU is still there {timeout:.0f} s after libvirt's "
                                  f"migration failed")

    async def done(self, c: Controller) -> None:
        """libvirt's job, to its end: MigrationFailed with libvirt's words if
        it failed."""
        if self.job is None:
            self.lv.close()
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.job), JOB_TIMEOUT)
        except asyncio.TimeoutError:
            raise MigrationFailed(f"libvirt's migration job did not end within {JOB_TIMEOUT:.0f} s") from None
        except QmpmigError as err:
            raise MigrationFailed(f"libvirt: {err}") from None
        finally:
            self.lv.close()
