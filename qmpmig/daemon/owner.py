"""``qmpmig daemon``: the one vfio-user client of its VMs' devices, for
each VM's life, and the controller of the migrations asked of it.

A VM handed over by ``attach`` keeps its device connections open, its guest
RAM mapped into them and its page requests answered until it ends (its
QEMU goes away, or ``detach``).  A migration is a request: it runs as a
task of the daemon, so the command that asked for it may exit or be killed
without touching a device or the migration.  After a migration the
destination's devices stay owned here, with their state; the source's are
released (a vfio-user device resets when its client leaves) once the
destination has them.  After a failure the source keeps its devices, and
the destination QEMU has been ended by the recovery.

The control socket lives in a 0700 directory, is 0600 itself, and each
connection's peer credentials (SO_PEERCRED) must be root's or the
daemon's own user's.  Every VM handed over and every step of every
migration is in the journal (:mod:`.journal`) before it is taken; a daemon
started after one that died ends what that one left half done
(:mod:`.restart`) and takes the VMs that still run back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import itertools
import json
import logging
import os
import socket
import ssl
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..controller import Controller, Options, RemoteDevice, Side, Trace
from ..controller.peerside import PeerSide
from ..controller.trace import device_list
from ..controller.precopy import settings_now
from ..device.bar0 import is_reference, read_register, start_ring
from ..errors import QmpmigError, reason
from ..libvirt.api import SYSTEM, Libvirt, LibvirtError
from ..libvirt.manager import LibvirtManager
from ..qemu.guestmem import COMPARE_CHUNK, GuestRam
from ..qemu.qmp import Qemu
from ..tools import tracecheck
from ..vfio_user.server import peer_uid
from . import control, incoming, journal, peer
from .restart import end_unfinished

log = logging.getLogger("qmpmig.daemon")

@dataclass(eq=False)
class AttachedVm:
    """A VM the daemon owns the devices of."""

    name: str
    qmp: str
    side: Side
    devices: list[RemoteDevice]
    #: Its journal record (how to take it back after a restart).
    record: dict = field(default_factory=dict)
    #: The id of the migration it takes part in, if any.
    busy: str | None = None
    watcher: asyncio.Task | None = field(default=None, repr=False)
    #: A peer daemon's VM: the connection to close once the migration ends.
    closer: peer.Peer | None = field(default=None, repr=False)
    #: A libvirt domain of this host (its hook handed it over): what its
    #: metadata says of incoming migrations (``refuse`` or ``follow``).
    libvirt: str | None = None


class Owner:
    """The daemon: its VMs, its migrations and its control socket."""

    def __init__(self, run_dir: Path, timeout: float = 300.0, listen: str | None = None,
                 tls_dir: Path = peer.DEFAULT_TLS_DIR, libvirt_uri: str = SYSTEM):
        self.run_dir = Path(run_dir)
        #: This host's libvirt, for the domains its hook hands over.
        self.libvirt_uri = libvirt_uri
        #: HOST:PORT where peer daemons reach this one (TLS, peer.PEER_OPS).
        self.listen, self.tls_dir = listen, Path(tls_dir)
        self.timeout = timeout
        self.vms: dict[str, AttachedVm] = {}
        #: migration id -> (controller, its task)
        self.migrations: dict[str, tuple[Controller, asyncio.Task]] = {}
        self._ids = itertools.count(1)
        self.stopped = asyncio.Event()
        #: control op -> its handler.
        self.ops = {"attach": self.attach, "detach": self.detach, "status": self.status,
                    "migrations": self.migrations_now, "migrate": self.migrate,
                    "migrate_libvirt": self.migrate_libvirt, "shutdown": self.shutdown,
                    "region": self.region, "expect": self.expect, "expected": self.expected,
                    "ram_write": self.ram_write, "ram_crcs": self.ram_crcs,
                    "incoming_qmp": self.incoming_qmp, "incoming_watch": self.incoming_watch,
                    "incoming_device": self.incoming_device, "incoming_end": self.incoming_end,
                    "incoming_wait": self.incoming_wait, "incoming_resume": self.incoming_resume}
        #: (domain, migration id) -> when the expectation lapses (monotonic).
        self.incoming: dict[tuple[str, str], float] = {}
        #: The expectations libvirt's ``migrate begin`` has used up.
        self.admitted: set[tuple[str, str]] = set()
        #: (domain, migration id) -> what this daemon saw of it, while expected.
        self.arrivals: dict[tuple[str, str], incoming.Arrival] = {}
        #: Incoming migrations over here -> why (the latest OVER_KEPT): what
        #: still comes for one of them is refused saying so.
        self.over: dict[str, str] = {}
        #: Incoming migrations ended here because their peer was lost, and how
        #: (the latest OVER_KEPT).
        self.peers_lost: list[dict] = []
        #: TCP connections to the peer port now open, handshakes included.
        self._peer_sockets: set[asyncio.StreamWriter] = set()
        self.journal: journal.Journal | None = None
        self._attaching: set[str] = set()
        #: Set by shutdown: no new VM or migration is taken.
        self.stopping = False
        #: What the start found half done and how it ended it.
        self.recovered: list[dict] = []
        #: Migrations of attached VMs that qmpmig did not drive, and how they were stopped.
        self.unmanaged: list[dict] = []
        #: The run directory's lock (flock), held while serving.
        self._lock = -1

    @property
    def socket_path(self) -> Path:
        return self.run_dir / control.SOCKET

    # -- the control socket -------------------------------------------------

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        """Serve the control socket until ``shutdown``; then release every VM."""
        listener = self._listen()
        tls = peer.context(self.tls_dir, "server") if self.listen else None
        await self._take_over()
        server = await asyncio.start_unix_server(self._connection, sock=listener)
        peers = None
        if self.listen:
            host, port = peer.split_address(self.listen)
            peers = await asyncio.start_server(lambda r, w: self._peer_accept(tls, r, w), host, port)
            log.info("peers served on %s (TLS, certificates of %s)", self.listen, self.tls_dir)
        (self.run_dir / "daemon.pid").write_text(f"{os.getpid()}\n")
        log.info("serving %s", self.socket_path)
        if ready:
            ready.set()
        try:
            await self.stopped.wait()
        finally:
            server.close()
            if peers:
                peers.close()
            self.stopping = True
            while self.migrations:
                _, task = next(iter(self.migrations.values()))
                await asyncio.wait({task})
            for vm in list(self.vms.values()):
                with contextlib.suppress(Exception):
                    await self.release(vm)
            self.socket_path.unlink(missing_ok=True)
            (self.run_dir / "daemon.pid").unlink(missing_ok=True)
            self.journal.close()
            os.close(self._lock)

    async def _take_over(self) -> None:
        """What the journal says an earlier daemon left: every unfinished
        migration ended on one side, every VM still running taken back
        (its devices were reset when that daemon died)."""
        path = self.run_dir / "journal.jsonl"
        vms, unfinished = journal.pending(journal.read(path))
        self.journal = journal.Journal(path)
        unsettled = []
        for m in unfinished:
            try:
                on_dst, message = await end_unfinished(m)
            except Exception as err:            # a start must never fail on what it finds
                log.exception("migration %s could not be ended", m.id)
                unsettled += m.records()
                self.recovered.append({"id": m.id, "ok": False, "message": f"not settled: {reason(err)}"})
                continue
            log.warning("migration %s: %s", m.id, message)
            self.journal.write("end", id=m.id, ok=on_dst, message=message)
            with contextlib.suppress(OSError):
                _trace_result(m.begin.get("trace"), on_dst, f"recovered by a new daemon: {message}")
            self.recovered.append({"id": m.id, "ok": on_dst, "message": message})
            vms.pop(m.begin.get("src_vm") if on_dst else m.begin.get("dst_vm"), None)
        self.journal.rewrite(list(vms.values()) + unsettled)
        for record in vms.values():
            try:
                await self.attach(record["vm"], record["qmp"], record["devices"], record["ram"],
                                  record.get("protocol"), record.get("start_ring"), record.get("libvirt"))
            except Exception as err:
                log.warning("%s not taken back: %s", record.get("vm"), reason(err))
                self.journal.write("release", vm=record.get("vm"))

    def _listen(self) -> socket.socket:
        """The control socket: 0600 in a 0700 directory of our own; refused
        while another daemon holds the directory's lock."""
        _own_dir(self.run_dir)
        self._lock = os.open(self.run_dir / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise QmpmigError(f"another qmpmig daemon serves {self.run_dir}") from None
        self.socket_path.unlink(missing_ok=True)     # a dead daemon's
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o177)
        try:
            sock.bind(str(self.socket_path))
        finally:
            os.umask(umask)
        os.chmod(self.socket_path, 0o600)
        sock.listen(16)
        return sock

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = peer_uid(writer.get_extra_info("socket"))
        try:
            if uid not in (0, os.getuid()):
                log.warning("refused a control connection from uid %d", uid)
                writer.write(control.reply(0, error=f"uid {uid} may not use this daemon"))
                return
            lines = control.LineReader()
            while data := await reader.read(1 << 16):
                for message in lines.feed(data):
                    writer.write(await self._answer(message))
                    await writer.drain()
        except control.ControlError as err:
            writer.write(control.reply(0, error=str(err)))
        except ConnectionError:
            pass
        finally:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

    async def _peer_accept(self, tls: ssl.SSLContext, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        """A TCP connection to the peer port: at most peer.MAX_PEER_SOCKETS
        at once, handshakes included (each holds a file descriptor, and a
        stranger need not finish one), each handshake within
        peer.PEER_TIMEOUT; then the peer (:meth:`_peer_connection`)."""
        origin = writer.get_extra_info("peername")
        if len(self._peer_sockets) >= peer.MAX_PEER_SOCKETS:
            log.warning("peer connection from %s refused: %d open already", origin, peer.MAX_PEER_SOCKETS)
            writer.transport.abort()
            return
        self._peer_sockets.add(writer)
        try:
            try:
                await writer.start_tls(tls, ssl_handshake_timeout=peer.PEER_TIMEOUT)
            except (ssl.SSLError, OSError, TimeoutError) as err:
                log.warning("peer connection from %s refused: no TLS session (%s)", origin,
                            reason(err) or type(err).__name__)
                writer.transport.abort()
                return
            await self._peer_connection(reader, writer)
        finally:
            self._peer_sockets.discard(writer)

    async def _peer_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A peer daemon, its certificate checked by the handshake: only
        peer.PEER_OPS, each answered as soon as it is done (a long poll
        holds no other request up).  The incoming migrations it announced
        (``expect``) are its own: once it is lost (its host falls silent for
        peer.LINK_TIMEOUT, or it asks nothing for peer.PEER_SILENCE while
        nothing of it is under way) each one it did not end is ended here
        (:meth:`_peer_lost`); once it closes the connection, each one it had
        begun to drive (an expectation alone lapses by itself)."""
        who = peer.peer_name(writer)
        log.info("peer %s connected from %s", who, writer.get_extra_info("peername"))
        peer.bound_dead_link(writer)
        #: Every request under way; those the peer waits on (no long poll).
        answering: set[asyncio.Task] = set()
        working: set[asyncio.Task] = set()
        announced: set[tuple[str, str]] = set()
        heard, why = [time.monotonic()], [""]

        async def answer(message: dict) -> None:
            answered = await self._answer(message, peer.PEER_OPS)
            if message.get("op") == "expect":
                args = message.get("args") if isinstance(message.get("args"), dict) else {}
                if (key := (args.get("domain"), args.get("migration"))) in self.arrivals:
                    announced.add(key)
            if message.get("op") not in peer.LONG_POLLS:
                heard[0] = time.monotonic()
            writer.write(answered)
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.drain()

        async def listen_for_silence() -> None:
            while not (any(key in self.arrivals and self.arrivals[key].driven for key in announced)
                       and not working and time.monotonic() - heard[0] > peer.PEER_SILENCE):
                await asyncio.sleep(0.25)
            why[0] = f"it asked nothing for {peer.PEER_SILENCE:g} s"
            writer.transport.abort()
        silence = asyncio.create_task(listen_for_silence())
        try:
            lines = control.LineReader()
            while data := await reader.read(1 << 16):
                heard[0] = time.monotonic()
                for message in lines.feed(data):
                    while len(answering) >= peer.MAX_IN_FLIGHT:
                        await asyncio.wait(answering, return_when=asyncio.FIRST_COMPLETED)
                    task = asyncio.create_task(answer(message))
                    answering.add(task)
                    task.add_done_callback(answering.discard)
                    if message.get("op") not in peer.LONG_POLLS:
                        working.add(task)
                        task.add_done_callback(working.discard)
        except control.ControlError as err:
            writer.write(control.reply(0, error=str(err)))
        except (ConnectionError, ssl.SSLError, TimeoutError, OSError) as err:
            why[0] = reason(err) or type(err).__name__
        finally:
            silence.cancel()
            with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
                await writer.drain()
            writer.close()
            if lost := [key for key in announced if key in self.arrivals
                        and (why[0] or key[0] in self.vms and self.vms[key[0]].busy == key[1])]:
                # What it left under way is cut short: its answers would go nowhere.
                for task in list(answering):
                    task.cancel()
                await asyncio.gather(*answering, return_exceptions=True)
                for key in lost:
                    await self._peer_lost(key, f"peer {who}: {why[0] or 'it closed the connection'}")

    async def _answer(self, message: dict, allowed: frozenset[str] | None = None) -> bytes:
        msg_id, op, args = message.get("id", 0), message.get("op"), message.get("args", {})
        handler = self.ops.get(op) if isinstance(op, str) and (allowed is None or op in allowed) else None
        if handler is None or not isinstance(args, dict):
            return control.reply(msg_id, error=f"no such request: {op!r}")
        try:
            control.check_args(op, args)
        except control.ControlError as err:
            return control.reply(msg_id, error=f"{op}: bad arguments: {err}")
        try:
            return control.reply(msg_id, await handler(**args))
        except (QmpmigError, OSError, ValueError) as err:
            return control.reply(msg_id, error=f"{op}: {reason(err)}")
        except Exception as err:                # a request never takes the daemon down
            log.exception("%s failed", op)
            return control.reply(msg_id, error=f"{op}: internal error: {reason(err)}")

    # -- VMs -----------------------------------------------------------------

    async def attach(self, name: str, qmp: str, devices: list[str], ram: str | None = None,
                     protocol: str | None = None, start_ring: list[int] | None = None,
                     libvirt: str | None = None) -> dict:
        """Take a VM's devices in: connect to its QMP and to each device, map
        its guest RAM into them (the file ``ram``, else the one QEMU's
        memory backend names), follow it.  ``start_ring`` (iova, size)
        plays the reference device's driver: each device gets its slice."""
        if name in self.vms or name in self._attaching:
            raise QmpmigError(f"{name} is attached already")
        if self.stopping:
            raise QmpmigError("the daemon is stopping")
        self._attaching.add(name)
        self.journal.write("attach", vm=name, qmp=qmp, ram=ram, devices=devices, protocol=protocol,
                           start_ring=start_ring, libvirt=libvirt)
        qemu = Qemu(name)
        opened: list[RemoteDevice] = []
        guest_ram = side = None
        try:
            await qemu.connect(qmp)
            ram = ram or await qemu.ram_backing()
            guest_ram = GuestRam(ram)
            for i, path in enumerate(devices):
                opened.append(await _bounded(RemoteDevice.open(path, protocol), f"dev{i} ({path}) opening"))
            side = Side(qemu, guest_ram, self.timeout)
            await _bounded(side.attach([(f"dev{i}", device) for i, device in enumerate(opened)]),
                           "the devices taking its guest RAM")
            if start_ring:
                await _drive_rings(opened, *start_ring)
        except BaseException:
            self._attaching.discard(name)
            self.journal.write("release", vm=name)
            if side:
                await side.unfollow()
            for device in opened:
                with contextlib.suppress(Exception):
                    await device.close()
            if guest_ram:
                guest_ram.close()
            await qemu.disconnect()
            raise
        self._attaching.discard(name)
        vm = AttachedVm(name, qmp, side, opened, libvirt=libvirt, record={
            "op": "attach", "vm": name, "qmp": qmp, "ram": ram, "devices": devices, "protocol": protocol,
            "start_ring": start_ring, "libvirt": libvirt})
        vm.watcher = asyncio.create_task(self._watch(vm))
        self.vms[name] = vm
        log.info("attached %s (%d devices)", name, len(opened))
        return await self._describe(vm)

    async def _watch(self, vm: AttachedVm) -> None:
        """A migration of the VM that qmpmig does not drive is stopped
        (:meth:`_stop_unmanaged`); a VM whose QEMU went away is over: its
        devices are released (after the migration it takes part in, if
        any, has ended)."""
        while not vm.side.gone:
            await vm.side.next_update(60.0)
            state = vm.side.vm
            if (not vm.busy and state and state.status in UNMANAGED and state.runstate != "inmigrate"
                    and not vm.side.gone):
                try:
                    await self._stop_unmanaged(vm)
                except Exception:           # the watch must go on to release the VM
                    log.exception("%s: stopping a migration qmpmig does not drive failed", vm.name)
        while vm.busy in self.migrations:
            _, task = self.migrations[vm.busy]
            with contextlib.suppress(BaseException):
                await asyncio.shield(task)
        if self.vms.get(vm.name) is vm:
            log.info("%s: QEMU gone (%s): releasing its devices", vm.name, vm.side.gone)
            await self.release(vm)

    async def _stop_unmanaged(self, vm: AttachedVm) -> None:
        """A migration of an attached VM that qmpmig does not drive (a plain
        ``virsh migrate`` to a host without qmpmig's hook; one of a domain
        whose metadata allows following; a ``migrate`` over anyone's QMP)
        would leave the devices' state behind.  Following it cannot keep
        the rules: its manager started QEMU before the devices logged their
        DMA, and libvirt answers pre-switchover at once, leaving the
        devices' stop-copy no window.  So it is cancelled before its
        switchover (libvirt's virDomainAbortJob for a domain, QMP
        ``migrate_cancel`` otherwise), and a trace of its own in the run
        directory records the violation and the outcome."""
        state = vm.side.vm
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = self.run_dir / f"unmanaged-{vm.name.replace('/', '_')}-{stamp}.jsonl"
        trace = Trace(str(path))
        trace.emit("start", devices=device_list(vm.side.devices, "src"))
        trace.emit("vm_state", side="src", runstate=state.runstate, status=state.status)
        why = ("its domain allows following, but a followed migration leaves the devices no window: its manager "
               "started QEMU before they logged their DMA, and libvirt answers pre-switchover at once"
               if vm.libvirt == "follow" else "their state would be left behind")
        trace.emit("violation", side="src", rule="managed",
                   message=f"{vm.name}: a migration qmpmig does not drive started (QEMU {state.status}); {why}")
        try:
            try:
                if not vm.libvirt:
                    raise LibvirtError("not a libvirt domain")
                with contextlib.closing(Libvirt(self.libvirt_uri)) as lv:
                    trace.emit("libvirt_call", side="src", call="virDomainAbortJob", qmp="migrate_cancel",
                               arguments={})
                    await lv.call("virDomainAbortJob", (await lv.domain(vm.name)).abortJob)
            except LibvirtError:
                # Not libvirt's migration (a migrate over someone's QMP): QEMU's own cancel.
                trace.emit("qmp_command", side="src", command="migrate_cancel", arguments={})
                await vm.side.qemu.execute("migrate_cancel")
            end = await vm.side.wait(lambda s: s.status not in UNMANAGED | {"cancelling"}, "the cancel", timeout=30)
            ok = end.status != "completed"
            outcome = (f"cancelled before its switchover ({end.status}): {vm.name} runs on here with its devices"
                       if ok else f"not cancelled in time: QEMU {end.status}, the guest left without its devices' "
                                  f"state, which stays here")
        except QmpmigError as err:
            ok, outcome = False, f"not cancelled: {reason(err)}"
        trace.emit("result", ok=False, message=f"a migration qmpmig does not drive: {outcome}")
        trace.close()
        log.warning("%s: a migration qmpmig does not drive: %s (trace %s)", vm.name, outcome, path)
        self.unmanaged.append({"vm": vm.name, "stopped": ok, "message": outcome, "trace": str(path)})

    async def release(self, vm: AttachedVm) -> None:
        """Let go of a VM: each device's connection closes (the device resets)."""
        if self.vms.get(vm.name) is vm:
            del self.vms[vm.name]
            self.journal.write("release", vm=vm.name)
        if vm.watcher and vm.watcher is not asyncio.current_task():
            vm.watcher.cancel()
        await vm.side.unfollow()
        for device in vm.devices:
            with contextlib.suppress(Exception):
                await device.close()
        vm.side.ram.close()
        await vm.side.qemu.disconnect()

    async def expect(self, domain: str, migration: str, seconds: float = 600.0) -> dict:
        """An incoming migration of ``domain`` that qmpmig drives is coming:
        the libvirt hook's ``migrate begin`` lets exactly it in.  A migration
        over here never comes again."""
        if migration in self.over:
            raise QmpmigError(f"migration {migration} is over here: {self.over[migration]}")
        now = time.monotonic()
        self.incoming = {key: end for key, end in self.incoming.items() if end > now}
        self.admitted &= set(self.incoming)
        self.arrivals = {key: self.arrivals[key] for key in self.incoming if key in self.arrivals}
        self.incoming[(domain, migration)] = now + seconds
        self.arrivals[(domain, migration)] = incoming.Arrival()
        return {"expected": True}

    async def expected(self, domain: str, migration: str) -> dict:
        """Whether :meth:`expect` announced this migration (once: an answer
        of yes uses the expectation up for admission; the migration's data
        may still come until it lapses)."""
        key = (domain, migration)
        yes = self.incoming.get(key, 0.0) > time.monotonic() and key not in self.admitted
        if yes:
            self.admitted.add(key)
        return {"expected": yes}

    def _incoming_vm(self, vm: str, migration: str) -> AttachedVm:
        """The attached VM an expected incoming migration drives from
        another host: announced by :meth:`expect` and not lapsed; taken for
        that migration (busy) from its first request to ``incoming_end``."""
        if migration in self.over:
            raise QmpmigError(f"migration {migration} is over here: {self.over[migration]}")
        if self.incoming.get((vm, migration), 0.0) <= time.monotonic():
            raise QmpmigError(f"no incoming migration {migration} of {vm} is expected")
        attached = self._vm(vm)
        if attached.busy not in (None, migration):
            raise QmpmigError(f"{vm} takes part in migration {attached.busy}")
        attached.busy = migration
        return attached

    async def incoming_end(self, vm: str, migration: str) -> dict:
        """The peer that drove migration ``migration`` into ``vm`` is done
        with it: the VM is this daemon's alone again."""
        attached = self._incoming_vm(vm, migration)
        attached.busy = None
        self._end_incoming((vm, migration), "its source ended it")
        return {"ended": migration}

    def _end_incoming(self, key: tuple[str, str], why: str) -> incoming.Arrival | None:
        """An incoming migration is over here: what still comes for it is refused."""
        self.incoming.pop(key, None)
        self.admitted.discard(key)
        self.over[key[1]] = why
        while len(self.over) > OVER_KEPT:
            del self.over[next(iter(self.over))]
        return self.arrivals.pop(key, None)

    async def _peer_lost(self, key: tuple[str, str], why: str) -> None:
        """The peer driving an incoming migration is lost before it ended
        it.  Before every device here loaded its state (the journal's rule)
        the guest's place is its source, which recovers it there: each
        device is reset and, once asked to listen, QEMU ended, so no second
        copy can ever run here.  After, the guest's place is here: nothing
        is destroyed or started, the VM is left as it is (its devices
        loaded, its vCPUs as the source left them) for whoever resumes it,
        and ``status`` says so."""
        vm, migration = key
        arrival = self._end_incoming(key, f"its peer was lost ({why})")
        attached = self.vms.get(vm)
        if arrival is None or attached is None or attached.busy != migration:
            outcome = "nothing here had been driven"
        elif arrival.committed(attached.side):
            state = attached.side.vm
            outcome = (f"every device here had loaded its state, the guest not yet started here; {vm} is kept "
                       f"{state and state.runstate} with its devices, never started by this daemon: the source "
                       f"runs the guest on when it loses this host before starting it here, so end this copy "
                       f"once the source is seen running it, and resume it only if the source is known not to")
        else:
            notes = []
            for end in attached.side.devices:
                try:
                    await asyncio.wait_for(incoming.device_call(attached.side, end.name, "reset", {}, arrival),
                                           ASK_DEVICE_TIMEOUT)
                    notes.append(f"{end.name} reset")
                except (QmpmigError, OSError, TimeoutError) as err:
                    notes.append(f"{end.name} not reset: {reason(err) or 'no answer'}")
            if not arrival.listening:
                notes.append("QEMU kept (never asked to listen, it holds nothing of the guest)")
            elif not attached.side.gone:
                try:
                    await attached.side.quit(QUIT_TIMEOUT)
                    notes.append("QEMU ended")
                except QmpmigError as err:
                    notes.append(f"QEMU not ended: {reason(err)}")
            outcome = "a device here had not loaded its state: " + ", ".join(notes)
        if attached is not None and attached.busy == migration:
            attached.busy = None
        log.warning("incoming migration %s of %s: its peer was lost (%s); %s", migration, vm, why, outcome)
        self.peers_lost = [*self.peers_lost[1 - OVER_KEPT:],
                           {"vm": vm, "migration": migration, "why": why, "outcome": outcome}]

    async def incoming_wait(self, vm: str, migration: str, timeout: float = 30.0) -> dict:
        """Until the VM of an expected migration is attached here: under
        libvirt the hook hands it over (``started``) after libvirt has
        started it for the incoming migration."""
        deadline = time.monotonic() + timeout
        while vm not in self.vms or self.vms[vm].side.gone:
            if time.monotonic() > deadline:
                raise QmpmigError(f"{vm} was not handed to this host's daemon within {timeout:g} s "
                                  f"(is qmpmig's libvirt hook installed here, with this run directory?)")
            if self.incoming.get((vm, migration), 0.0) <= time.monotonic():
                raise QmpmigError(f"no incoming migration {migration} of {vm} is expected")
            await asyncio.sleep(0.05)
        self._incoming_vm(vm, migration)
        return {"attached": vm}

    async def incoming_resume(self, vm: str, migration: str) -> dict:
        """Resume the domain through this host's libvirt (libvirt left it
        paused: VIR_MIGRATE_PAUSED); it waits for libvirt's incoming job to
        end first."""
        attached = self._incoming_vm(vm, migration)
        with contextlib.closing(Libvirt(self.libvirt_uri)) as lv:
            await lv.call("virDomainResume", (await lv.domain(vm)).resume)
        await attached.side.wait(lambda s: s.runstate == "running", "running after virDomainResume", timeout=30)
        return {"resumed": vm}

    async def ram_write(self, vm: str, migration: str, pages: list[int], data: bytes | str, crc: int) -> dict:
        """Guest pages from the source host (those its devices wrote by DMA,
        which QEMU cannot see): written only if their CRC-32 holds."""
        attached = self._incoming_vm(vm, migration)
        attached.side.ram.write_pages(pages, incoming.checked(data, crc, "nothing written"))
        return {"written": len(pages)}

    async def incoming_qmp(self, vm: str, migration: str, command: str, arguments: dict | None = None) -> dict:
        return await incoming.qmp(self._incoming_vm(vm, migration).side, command, arguments,
                                  self.arrivals[(vm, migration)])

    async def incoming_watch(self, vm: str, migration: str, since: int, timeout: float = peer.LONG_POLL_MAX) -> dict:
        return await incoming.watch(self._incoming_vm(vm, migration).side, since, timeout)

    async def incoming_device(self, vm: str, migration: str, device: str, call: str, **args) -> dict:
        return await incoming.device_call(self._incoming_vm(vm, migration).side, device, call, args,
                                          self.arrivals[(vm, migration)])

    async def ram_crcs(self, vm: str, migration: str) -> dict:
        """CRC-32 of each MiB of the guest RAM, for the source host to
        compare with its own (--verify-ram across hosts)."""
        ram = self._incoming_vm(vm, migration).side.ram
        return {"size": ram.size, "chunk": COMPARE_CHUNK, "crcs": await asyncio.to_thread(ram.crcs)}

    async def detach(self, name: str, when_idle: bool = False) -> dict:
        """Let go of a VM; one a migration uses is refused, or, ``when_idle``
        (libvirt's ``release`` hook: the domain ended, maybe by the
        migration itself), let go of once that migration has ended."""
        vm = self._vm(name)
        while when_idle and vm.busy in self.migrations:
            _, task = self.migrations[vm.busy]
            with contextlib.suppress(BaseException):
                await asyncio.shield(task)
        if self.vms.get(name) is not vm:
            return {"detached": name}
        if vm.busy:
            raise QmpmigError(f"{name} takes part in migration {vm.busy}")
        await self.release(vm)
        return {"detached": name}

    async def region(self, vm: str, device: str, index: int, offset: int, count: int | None = None,
                     data: str | None = None) -> dict:
        """REGION_READ ``count`` bytes, or REGION_WRITE ``data`` (hex), on a
        device of an attached VM no migration uses: the daemon holds the
        only connection, so this is how a driver's access gets there."""
        attached = self._vm(vm)
        if attached.busy:
            raise QmpmigError(f"{vm} takes part in migration {attached.busy}")
        ends = {end.name: end for end in attached.side.devices}
        if device not in ends:
            raise QmpmigError(f"{vm} has no device {device!r} (it has {', '.join(ends)})")
        if (count is None) == (data is None):
            raise QmpmigError("a region request reads count bytes or writes data, one of the two")
        client = ends[device].device.client
        if data is not None:
            await asyncio.wait_for(client.region_write(index, offset, bytes.fromhex(data)), ASK_DEVICE_TIMEOUT)
            return {"written": len(data) // 2}
        return {"data": (await asyncio.wait_for(client.region_read(index, offset, count), ASK_DEVICE_TIMEOUT)).hex()}

    def _vm(self, name: str) -> AttachedVm:
        if name not in self.vms:
            raise QmpmigError(f"no VM {name!r} is attached")
        return self.vms[name]

    async def status(self) -> dict:
        now = time.monotonic()
        return {"pid": os.getpid(), "recovered": self.recovered, "unmanaged": self.unmanaged,
                "incoming": [{"vm": vm, "migration": mid} for (vm, mid), end in self.incoming.items() if end > now],
                "peers_lost": self.peers_lost,
                "vms": [await self._describe(vm) for vm in list(self.vms.values())],
                **await self.migrations_now()}

    async def migrations_now(self) -> dict:
        """The migrations under way (the part of ``status`` that asks no
        device or QEMU anything: a progress line polls it)."""
        return {"migrations": [_progress(mid, c) for mid, (c, _) in self.migrations.items()]}

    async def _describe(self, vm: AttachedVm) -> dict:
        """What a VM looks like now; its devices are asked for their state
        hash and (the reference device) DMA records only when no migration
        uses them."""
        state = vm.side.vm
        devices = []
        for end in vm.side.devices:
            device = incoming.describe(end)
            if not vm.busy and not vm.side.gone:
                try:
                    device.update(await asyncio.wait_for(_ask_device(end.device), ASK_DEVICE_TIMEOUT))
                except (OSError, QmpmigError, TimeoutError) as err:
                    device["unanswered"] = reason(err) or f"no answer within {ASK_DEVICE_TIMEOUT:g} s"
            devices.append(device)
        described = {"name": vm.name, "qmp": vm.qmp, "runstate": state and state.runstate,
                     "status": state and state.status, "gone": vm.side.gone, "busy": vm.busy, "devices": devices}
        if not vm.busy and not vm.side.gone:
            with contextlib.suppress(QmpmigError):
                described["settings"] = await settings_now(vm.side.qemu)
        return described

    # -- migrations ----------------------------------------------------------

    async def migrate(self, src: str, dst: str, uri: str, trace: str | None = None,
                      options: dict | None = None, peer: str | None = None) -> dict:
        """Migrate VM ``src`` to VM ``dst`` (waiting with ``-incoming defer``),
        attached here or, with ``peer`` (HOST:PORT), to the daemon there;
        the reply comes when it has ended, but the migration does not
        depend on the connection that asked for it."""
        source, opts = self._source(src, options, peer)
        if not peer and self._vm(dst).busy:
            raise QmpmigError(f"{dst} takes part in migration {self._vm(dst).busy}")
        destination = await self._peer_vm(dst, peer) if peer else self._vm(dst)
        if source is destination:
            raise QmpmigError("source and destination are the same VM")
        controller = Controller(source.side, destination.side, uri, Trace(trace), Options(**opts))
        return await self._run(controller, source, destination, uri=uri, trace=trace, peer=peer)

    async def migrate_libvirt(self, domain: str, to: str, peer: str, migrate_uri: str | None = None,
                              trace: str | None = None, options: dict | None = None) -> dict:
        """Migrate libvirt domain ``domain`` (its hook handed it here) to the
        libvirt at ``to``, its devices to the daemon at ``peer``
        (docs/libvirt-flow.md); libvirt drives QEMU's migration."""
        source, opts = self._source(domain, options, peer)
        if not source.libvirt:
            raise QmpmigError(f"{domain} was not handed to this daemon by qmpmig's libvirt hook")
        if source.side.vm.runstate != "running":
            # Stopped vCPUs dirty nothing: QEMU would switch over, and libvirt
            # continue it, before the devices' stop-copy could end.
            raise QmpmigError(f"{domain} is {source.side.vm.runstate}: qmpmig migrates only a running domain "
                              f"under libvirt")
        destination = await self._peer_vm(domain, peer, attach=False)
        manager = LibvirtManager(Libvirt(self.libvirt_uri), domain, to, destination.busy, migrate_uri)
        controller = Controller(source.side, destination.side, migrate_uri or "", Trace(trace), Options(**opts),
                                manager)
        return await self._run(controller, source, destination, uri=migrate_uri, trace=trace, peer=peer,
                               libvirt=to)

    def _source(self, name: str, options: dict | None, peer: str | None) -> tuple[AttachedVm, dict]:
        """The VM a migration would start from, and the migration's options."""
        if self.stopping:
            raise QmpmigError("the daemon is stopping")
        source = self._vm(name)
        if source.busy:
            raise QmpmigError(f"{name} takes part in migration {source.busy}")
        opts = dict(options or {})
        opts["debug"] = frozenset(opts.get("debug", ()))
        opts["compare_regions"] = tuple(opts.get("compare_regions", ()))
        if peer and opts["compare_regions"]:
            raise QmpmigError("--compare-regions reads the destination's regions: not across hosts")
        return source, opts

    async def _run(self, controller: Controller, source: AttachedVm, destination: AttachedVm, **record) -> dict:
        """The migration as a task of the daemon, journalled step by step."""
        mid = destination.busy or f"m{os.getpid()}-{next(self._ids)}"
        self.journal.write("migrate", id=mid, src=source.qmp, dst=destination.qmp, src_vm=source.name,
                           dst_vm=destination.name, running=source.side.vm.runstate == "running", **record)
        controller.note = lambda op, **fields: self.journal.write(op, id=mid, **fields)
        source.busy = destination.busy = mid
        for vm in (source, destination):
            vm.side.timeout = controller.options.timeout    # the QMP waits of this migration
        task = asyncio.create_task(self._migrate(mid, controller, source, destination))
        self.migrations[mid] = (controller, task)
        return await asyncio.shield(task)

    async def _peer_vm(self, name: str, address: str, attach: bool = True) -> AttachedVm:
        """VM ``name`` of the daemon at ``address`` as a destination: that
        daemon is told to expect the migration, then its VM and devices are
        driven through it (controller/peerside.py) over one TLS connection
        (taken in now, or, under libvirt, once it is there)."""
        mid = f"m{os.getpid()}-{next(self._ids)}"
        connection = peer.Peer(address, self.tls_dir)
        await connection.__aenter__()
        try:
            async with asyncio.timeout(peer.PEER_TIMEOUT):     # a hung peer, before any long poll
                await connection.call("expect", domain=name, migration=mid)
                side = PeerSide(connection.bound(vm=name, migration=mid), f"{name}@{address}", self.timeout)
                if attach:
                    await side.attach()
        except BaseException as err:
            await connection.__aexit__(None, None, None)
            if isinstance(err, TimeoutError):
                raise peer.PeerError(f"peer {address}: the migration's setup had no answer within "
                                     f"{peer.PEER_TIMEOUT:g} s") from None
            raise
        vm = AttachedVm(f"{name}@{address}", "", side, [], closer=connection)
        vm.busy = mid       # taken up by migrate()
        return vm

    async def _migrate(self, mid: str, controller: Controller, source: AttachedVm,
                       destination: AttachedVm) -> dict:
        trace = controller.trace
        summary = None
        lost = None
        if destination.closer:      # a hung peer holds a paused guest no longer than a device may
            destination.closer.deadline_of = controller.walker.paused_deadline
            lost = asyncio.create_task(_cancel_when_peer_lost(controller))
        try:
            summary = await controller.migrate()
        finally:
            if lost:
                lost.cancel()
            trace.close()
            for vm in (source, destination):
                vm.side.trace = Trace(keep=False)
                vm.side.timeout = self.timeout
                vm.busy = None
            if destination.closer:          # a peer's VM: the channel to its daemon
                await destination.side.unfollow()
                with contextlib.suppress(QmpmigError):
                    # A peer that does not answer within its silence bound has lost this connection.
                    await destination.closer.call("incoming_end", vm=destination.name.partition("@")[0],
                                                  migration=mid, within=peer.PEER_SILENCE)
                await destination.closer.__aexit__(None, None, None)
            del self.migrations[mid]
            if summary is not None:
                self.journal.write("end", id=mid, ok=summary.ok, guest_on=summary.guest_on,
                                   message=summary.message)
                if summary.guest_on == "destination":
                    await self.release(source)
                if not self.migrations and not self._attaching:
                    # Idle: the journal need say no more than what is owned.
                    self.journal.rewrite([vm.record for vm in self.vms.values()])
        if not summary.ok:
            log.warning("migration %s: %s", mid, summary.message)
        result = summary.as_dict()
        result["id"] = mid
        result["trace_violations"] = [str(v) for v in tracecheck.check(trace.records)]
        result["devices"] = {p.name: {"src_hash": p.src_hash and p.src_hash.hex(),
                                      "dst_hash": p.dst_hash and p.dst_hash.hex(), "compared": p.compared}
                             for p in controller.pairs}
        return result

    async def shutdown(self) -> dict:
        """Stop serving once the migrations under way have ended; every
        VM is released (its devices reset)."""
        self.stopping = True
        self.stopped.set()
        return {"stopping": os.getpid()}


#: QEMU migration statuses of a source that has not switched over yet: a
#: migration in one of them that qmpmig does not drive is stopped.
UNMANAGED = frozenset({"setup", "active", "pre-switchover"})

#: Seconds a device may take to answer ``status``.
ASK_DEVICE_TIMEOUT = 2.0
#: Seconds an incoming QEMU may take to end once told to (``quit``).
QUIT_TIMEOUT = 10.0
#: Incoming migrations over here remembered (to refuse what still comes),
#: and peers lost.
OVER_KEPT = 256
#: glibc's mallopt(3) parameter: blocks at least this large are mmapped.
M_MMAP_THRESHOLD = -3
#: The daemon's threshold: the buffers of device stream pieces and peer
#: payloads (up to 4 MiB) go back to the kernel when freed.  glibc's own
#: threshold rises to their size once the first is freed, and the heap they
#: then come from grows with its fragments (the 100-migration soak across
#: hosts: mean RSS 65 to 107 MiB without, level at 40 to 51 MiB with).
DAEMON_MMAP_THRESHOLD = 1 << 20


def steady_malloc() -> bool:
    """Fix glibc's mmap threshold for this process (a fixed one is not
    raised dynamically); False where the C library has no mallopt."""
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, DAEMON_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


#: Seconds a device may take over one step of an attach.
ATTACH_TIMEOUT = 10.0


async def _bounded(step, what: str):
    """An attach step a silent device must not hang: given up on, named."""
    try:
        return await asyncio.wait_for(step, ATTACH_TIMEOUT)
    except TimeoutError:
        raise QmpmigError(f"{what}: no answer within {ATTACH_TIMEOUT:g} s") from None


async def _ask_device(device: RemoteDevice) -> dict:
    """What ``status`` shows of a device no migration uses: its state hash
    where it offers one; the reference device's DMA record count, DMA
    faults and client losses."""
    answers = {}
    if digest := await device.state_hash():
        answers["state_hash"] = digest.hex()
    if await is_reference(device.client):
        for register in ("dma_seq", "dma_faults", "client_losses"):
            answers[register] = await read_register(device.client, register)
    return answers


def _own_dir(path: Path) -> None:
    """The run directory: made 0700 if missing; refused unless it is a real
    directory of this user's, in a parent no other user could swap it in
    (this user's or root's, and sticky if others may write to it)."""
    me = os.getuid()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    parent = path.parent.stat()
    if parent.st_uid not in (0, me) or (parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX):
        raise QmpmigError(f"{path.parent} may be changed by other users: choose another --run-dir")
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != me:
        raise QmpmigError(f"{path} is not a directory of uid {me} (a symbolic link or another user's)")
    os.chmod(path, 0o700)


async def _cancel_when_peer_lost(c: Controller) -> None:
    """A peer destination lost before the guest's place became the
    destination: the source QEMU's migration is cancelled at once, as the
    recovery would, for a stream blocked on a dead link never ends by itself
    (the flow waiting on the source QEMU in switchover would wait out
    Options.timeout, the vCPUs stopped)."""
    while not await c.dst.wait_gone(60.0):
        pass
    if not c.run.committed and c.run.phase not in ("idle", "recover", "failed", "done"):
        log.warning("the destination's daemon is lost (%s): cancelling the source's migration", c.dst.gone)
        with contextlib.suppress(QmpmigError):
            await c.manager.cancel(c)


def _progress(mid: str, controller: Controller) -> dict:
    """A migration under way, as ``status`` and the progress line show it."""
    run = controller.run
    return {"id": mid, "src": controller.src.qemu.name, "dst": controller.dst.qemu.name, "phase": run.phase,
            "ram_remaining": run.ram_remaining, "pending": run.pending,
            "device_bytes": sum(p.sent for p in controller.pairs)}


def _trace_result(path: str | None, ok: bool, message: str) -> None:
    """The end of a migration whose daemon died, added to its trace."""
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        seq = sum(1 for _ in f)
    with open(path, "a") as f:
        f.write(json.dumps({"seq": seq, "t": 0.0, "kind": "result", "ok": ok, "message": message}) + "\n")


async def _drive_rings(devices: list[RemoteDevice], iova: int, size: int) -> None:
    """Play the reference device's driver: each device writes its DMA
    records into its share of [iova, iova+size)."""
    share = size // max(1, len(devices))
    for i, device in enumerate(devices):
        if not await is_reference(device.client):
            raise QmpmigError(f"dev{i} is not qmpmig's reference device: no ring to start")
        await start_ring(device.client, iova + i * share, share)
