"""``qmpmig check``: a conformance run against a vfio-user device server.

:data:`RULES` is the table, one row per rule: its id, what the device must
offer for it to apply, the rule in one sentence, where the rule comes from
(a seed file, a section of ``reference/vfio-uapi.md`` or
``reference/vfio-user.md``, the reference device's PROTOCOL.md), and the
coroutine that checks it on the live device.  :func:`run` probes the device
once, then runs every row over that one connection, as a client would:
many servers (libvfio-user's samples among them) serve one client and exit
when it leaves.  Each rule starts from RUNNING (DEVICE_RESET; a SET to
RUNNING where the server refuses the reset).  The malformed-message rule
needs connections of its own: it is skipped, with the reason, when the
server is gone by then.  Given ``--server-cmd``, check starts the server
itself, again whenever a connection needs one, and says how each one that
died ended (its exit status, and the case it was in).

A check returns a short detail when the device keeps the rule and raises
:class:`Fail` with what it saw otherwise.  Checks that walk many cases (arcs,
device_state values) try them all, then fail once naming each bad case
(``STOP_COPY -> PRE_COPY: accepted, device_state now PRE_COPY``).  Every
rule has a time limit; a row is printed as soon as it is decided.

Everything goes through :class:`qmpmig.controller.RemoteDevice` (v1 or v2 behind
the v2 words) and its vfio-user client, except the malformed-message rule,
which writes raw bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import errno
import functools
import json
import mmap
import os
import signal
import socket as socketlib
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from ..controller.devices import RemoteDevice
from ..device import records
from ..device.bar0 import CTRL_DMA_ENABLE, MAGIC, REGISTERS, is_reference, read_register, write_register
from ..errors import Disconnected, InvalidTransition, QmpmigError, reason
from ..migration import fsm
from ..migration.fsm import v1_requestable
from ..migration.states import V1, MigFlags, MigState, v1_normalize
from ..rig.processes import DeviceProcess
from ..vfio_user import codec
from ..vfio_user.codec import HEADER, Command, HeaderFlags
from ..vfio_user.uapi import PAGE_SIZE, Feature, PciRegion, FeatureFlags, bitmap_pages, dirty_bitmap_size

ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P = MigState
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

#: Seconds a server whose client left is given to exit before check
#: starts another (--server-cmd).
EXIT_GRACE = 2.0
#: A rule that has no verdict by then fails.
RULE_TIMEOUT = 60.0
#: How long a raw connection waits for one reply.
REPLY_TIMEOUT = 5.0
#: A STOP_COPY stream is endless past this many reads, or past four times
#: the device's own estimate (MIG_DATA_SIZE, pending_bytes) plus STREAM_SLACK.
MAX_READS = 1 << 16
STREAM_SLACK = 1 << 30
#: Pre-copy reads before moving on to STOP_COPY (the device may go on dirtying).
PRECOPY_READS = 64
#: Checks that read the v1 region look at this many iterations.
V1_ITERATIONS = 3

#: The memory the checks DMA_MAP (a memfd) and the reference device's ring in it.
RING_IOVA, RING_SIZE = 0x4000_0000, 64 << 10
RING_SLOTS = RING_SIZE // records.SIZE
LOG_PAGE = PAGE_SIZE
DMA_RATE = 2000
QUIET_SECONDS = 0.3
SCRATCH = 0x5CA7C4EC0FFEE

#: What a row of RULES may need -> why it is skipped without it.
NEEDS = {
    "v1": "the device migrates by v2, not by a v1 migration region",
    "v2": "the device migrates by a v1 migration region, not by v2",
    "peer": "no --peer given",
    "dma-logging": "DMA_LOGGING_START/STOP/REPORT not offered (PROBE)",
    "reference": "not qmpmig's reference device (BAR0 magic)",
    "quiesce": "neither P2P (v2) nor NDMA (v1)",
}
LOGGING_OPS = ((Feature.DMA_LOGGING_START, FeatureFlags.SET), (Feature.DMA_LOGGING_STOP, FeatureFlags.SET),
               (Feature.DMA_LOGGING_REPORT, FeatureFlags.GET))


class CheckError(QmpmigError):
    """No conformance run: the device (or peer) cannot be reached or does not migrate."""


class Fail(QmpmigError):
    """The device broke the rule; the message says how."""


class Skip(QmpmigError):
    """The rule cannot be checked now; the message says why."""


#: The case the running rule is in (set by :func:`_try`): what a dying server
#: was doing.
CASE: contextvars.ContextVar[list[str]] = contextvars.ContextVar("case", default=[""])


@dataclass(frozen=True)
class Rule:
    id: str
    needs: tuple[str, ...]
    text: str
    source: str
    check: Callable[[Context], Awaitable[str]]


@dataclass(frozen=True)
class Result:
    id: str
    status: str
    text: str
    source: str
    detail: str
    seconds: float


@dataclass
class Context:
    """What the probe found out, shared by every check, and the connections
    the checks share: one to the device, one to the peer."""

    socket: str
    peer: str | None
    protocol: str
    flags: int
    facts: frozenset[str]
    state_hash: bool
    servers: Servers
    _stream: bytes | None = None
    _connections: dict[str, Connection] = dataclasses.field(default_factory=dict)

    @classmethod
    async def probe(cls, socket: str, peer: str | None = None, protocol: str | None = None,
                    servers: Servers | None = None) -> Context:
        servers = servers or Servers()
        if peer and os.path.exists(peer) and os.path.exists(socket) and os.path.samefile(peer, socket):
            raise CheckError("--peer must be another device than --socket")
        dev = await _connect(socket, protocol, servers, probing=True)
        facts = {dev.protocol, *(("peer",) if peer else ())}
        if dev.flags & MigFlags.P2P:
            facts.add("quiesce")
        if all([await dev.client.probe(feature, op) for feature, op in LOGGING_OPS]):
            facts.add("dma-logging")
        if await is_reference(dev.client) and await read_register(dev.client, "magic") == MAGIC:
            facts.add("reference")
        ctx = cls(socket, peer, dev.protocol, dev.flags, frozenset(facts),
                  await dev.client.probe(Feature.QMPMIG_STATE_HASH), servers)
        ctx._connections[socket] = Connection(ctx, socket, dev)
        if peer:
            ctx._connections[peer] = Connection(ctx, peer, await _connect(peer, ctx.protocol, servers, probing=True))
        return ctx

    @contextlib.asynccontextmanager
    async def open(self, path: str | None = None) -> AsyncIterator[Connection]:
        """The shared connection to the device (or ``path``, the peer),
        back in RUNNING; a new one if the last closed (Skip if the server is
        gone)."""
        path = path or self.socket
        conn = self._connections.get(path)
        if conn is None:
            conn = self._connections[path] = Connection(self, path, None)
            await conn.renew()
        await _fresh(conn)
        yield conn

    async def hang_up(self, path: str) -> None:
        """Close the shared connection to ``path`` (a rule needs new ones)."""
        if (conn := self._connections.pop(path, None)) and conn.device:
            await conn.device.close()
            self.servers.left(path)

    async def close(self) -> None:
        for path in list(self._connections):
            await self.hang_up(path)
        self.servers.stop()

    async def saved_stream(self, dev: RemoteDevice) -> bytes:
        """A whole stop-copy stream of the device freshly reset, saved once:
        valid data for the checks that must leave RESUMING."""
        if self._stream is None:
            await _fresh(dev)
            self._stream = await _save(dev, RUNNING)
            await _fresh(dev)
        return self._stream


class Connection:
    """The shared connection to one server, standing for the device behind
    it; renewed (a fresh connection resets the device, as closing a VFIO
    device fd does) when nothing else brings the device back to RUNNING."""

    def __init__(self, ctx: Context, path: str, device: RemoteDevice | None):
        self.ctx, self.path, self.device = ctx, path, device

    def __getattr__(self, name: str):
        return getattr(self.device, name)

    async def renew(self) -> None:
        """A new connection (Skip if the server takes none)."""
        if self.device:
            await self.device.close()
            self.ctx.servers.left(self.path)
        self.device = None
        try:
            self.device = await _connect(self.path, self.ctx.protocol, self.ctx.servers)
        except (OSError, ValueError, TimeoutError, QmpmigError) as err:
            raise Skip(f"no connection to {self.path}: {reason(err)}{self.ctx.servers.ended(self.path)}") from None


class Servers:
    """With ``--server-cmd``: the server processes check starts, one per
    socket, started again when a connection needs one and the last has
    exited; and what became of each that exited."""

    def __init__(self, command: str | None = None):
        self.command = command
        self.procs: dict[str, DeviceProcess] = {}
        #: socket -> how its servers ended, in order.
        self.endings: dict[str, list[str]] = {}
        #: sockets whose client left since their server was last looked at.
        self._left: set[str] = set()

    def left(self, path: str) -> None:
        """A client of ``path`` closed its connection: a server of one
        client is on its way out, and the next connection must not land in
        its backlog."""
        self._left.add(path)

    def ensure(self, path: str) -> None:
        """A server listening on ``path`` (when check starts them); one
        whose client just left is first given a moment to exit, as a server
        of one client does."""
        if not self.command:
            return
        self.settle(path, path in self._left)
        if path not in self.procs:
            self.procs[path] = DeviceProcess(path, command=self.command).start()

    def restart(self, path: str) -> bool:
        """A fresh server on ``path`` after the one there refused a
        connection (a server of one client that is still on its way out);
        False when check does not start the servers."""
        if not self.command:
            return False
        self.ended(path)
        proc = self.procs.pop(path, None)
        if proc is not None:
            proc.close()
        self.procs[path] = DeviceProcess(path, command=self.command).start()
        return True

    def settle(self, path: str, lost: bool) -> None:
        """Note how the server of ``path`` ended if it has; when its client
        was ``lost``, first give it a moment to exit."""
        proc = self.procs.get(path)
        if proc is not None and lost:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.proc.wait(EXIT_GRACE)
        self._left.discard(path)
        self.ended(path)

    def ended(self, path: str) -> str:
        """How the servers of ``path`` that failed (a signal, a non-zero
        exit status) ended, for a message."""
        proc = self.procs.get(path)
        if proc is not None and not proc.alive():
            del self.procs[path]
            code = proc.proc.returncode
            if code:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
                last = proc.log_tail(1)
                self.endings.setdefault(path, []).append(f"the server {how}" + (f": {last}" if last else ""))
        endings = self.endings.get(path)
        return f" ({'; '.join(dict.fromkeys(endings))})" if endings else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.close()
        self.procs.clear()


async def _connect(path: str, protocol: str | None, servers: Servers, probing: bool = False) -> RemoteDevice:
    """A RemoteDevice on ``path``; when ``probing``, failing to open it is
    CheckError (exit status 2), not a failed rule."""
    try:
        servers.ensure(path)
        try:
            return await asyncio.wait_for(RemoteDevice.open(path, protocol), REPLY_TIMEOUT)
        except (ConnectionRefusedError, FileNotFoundError):
            if not servers.restart(path):
                raise
            return await asyncio.wait_for(RemoteDevice.open(path, protocol), REPLY_TIMEOUT)
    except (OSError, ValueError, TimeoutError, QmpmigError) as err:
        if not probing:
            raise
        why = str(err) or type(err).__name__
        raise CheckError((why if path in why else f"{path}: {why}") + servers.ended(path)) from err


async def _fresh(dev: RemoteDevice | Connection) -> None:
    """Back to RUNNING, as a client would: DEVICE_RESET; where the server
    refuses it (libvfio-user in STOP), a SET to RUNNING; where that fails
    too, a new connection (Fail if there is none to be had: the device
    could not be brought back)."""
    if isinstance(dev, Connection) and (dev.device is None or dev.device.client.closed.is_set()):
        await dev.renew()
    refusals = []
    for name, step in (("DEVICE_RESET", dev.reset), ("a SET to RUNNING", lambda: dev.set_state(RUNNING))):
        try:
            await step()
            return
        except Disconnected as err:
            refusals.append(f"{name}: {err}")
            break
        except OSError as err:
            refusals.append(f"{name}: {err}")
    why = f"the device cannot be brought back to RUNNING ({'; '.join(refusals)})"
    if not isinstance(dev, Connection):
        raise Fail(why)
    try:
        await dev.renew()
    except Skip as err:
        raise Fail(f"{why}, and {err}: a server of one client? (--server-cmd lets check start it anew)") from None


# -- case bookkeeping -----------------------------------------------------------

async def _try(label: str, step: Awaitable[object]) -> list[str]:
    """Run one case: [] if it holds, else ["label: what went wrong"]."""
    CASE.get()[0] = label
    try:
        await step
    except Disconnected:
        raise Fail(f"{label}: the server closed the connection") from None
    except (QmpmigError, OSError, ValueError) as err:
        return [f"{label}: {err}"]
    return []


def _judge(problems: list[str], detail: str) -> str:
    """``detail`` if nothing went wrong, else Fail naming every problem."""
    if problems:
        raise Fail("; ".join(problems))
    return detail


def _verdict(problems: list[str], cases: int, what: str) -> str:
    """:func:`_judge` for a count of cases: the first four bad ones named."""
    if problems:
        more = f"; ... {len(problems) - 4} more" if len(problems) > 4 else ""
        raise Fail(f"{len(problems)} of {cases} {what} wrong: " + "; ".join(problems[:4]) + more)
    return f"{cases} {what}"


async def _succeeds(step: Awaitable[object]) -> bool:
    try:
        await step
    except OSError:
        return False
    return True


# -- moving a device between states, saving and resuming -------------------------

async def _walk(dev: RemoteDevice, cur: MigState, target: MigState) -> None:
    """From ``cur`` to ``target`` by single arcs (fsm.plan), one SET each
    (v1: one device_state write of each state's twin)."""
    for step in fsm.plan(cur, target, dev.flags):
        try:
            await dev.set_state(step)
        except OSError as err:
            raise Fail(f"{cur.name} -> {step.name} refused: {err}") from None
        cur = step


async def _reach(dev: RemoteDevice, *path: MigState, stream: bytes = b"") -> None:
    """Back to RUNNING, then walk through ``path``; in RESUMING write
    ``stream``, so that leaving it loads valid data."""
    await _fresh(dev)
    cur = RUNNING
    for state in path:
        await _walk(dev, cur, state)
        cur = state
    if cur is RESUMING and stream:
        await dev.write_data(stream)


async def _expect_state(dev: RemoteDevice, want: MigState, when: str) -> None:
    got = await dev.state()
    if got is not want:
        raise Fail(f"{when}: device_state {got.name}, want {want.name}")


async def _stream_limit(dev: RemoteDevice) -> int:
    """The bytes after which the stream that starts now counts as endless."""
    try:
        estimate = await dev.pending()
    except OSError:
        estimate = 0
    return 4 * estimate + STREAM_SLACK


async def _read(dev: RemoteDevice, reads: int, limit: int) -> tuple[bytes, bool]:
    """Migration data until an empty read (True), or ``reads`` reads or
    ``limit`` bytes (False)."""
    data = bytearray()
    for _ in range(reads):
        piece = await dev.read_data()
        if not piece:
            return bytes(data), True
        data += piece
        if len(data) > limit:
            break
    return bytes(data), False


async def _save(dev: RemoteDevice, cur: MigState, precopy: bool = False) -> bytes:
    """From ``cur``: pre-copy while data comes (if asked), then STOP_COPY to
    the end of the stream, then STOP.  The whole stream."""
    data = b""
    if precopy:
        await _walk(dev, cur, PRE_COPY)
        data, _ = await _read(dev, PRECOPY_READS, await _stream_limit(dev))
        cur = PRE_COPY
    await _walk(dev, cur, STOP_COPY)
    rest, ended = await _read(dev, MAX_READS, await _stream_limit(dev))
    if not ended:
        raise Fail(f"the STOP_COPY stream has not ended after {len(rest)} bytes")
    await _walk(dev, STOP_COPY, STOP)
    return data + rest


async def _resume(dev: RemoteDevice, stream: bytes) -> None:
    """Reset, RESUMING, write ``stream``, RESUMING -> STOP."""
    try:
        await _reach(dev, RESUMING, stream=stream)
    except OSError as err:
        raise Fail(f"RESUMING refused the stream: {err}") from None
    await _walk(dev, RESUMING, STOP)
    await _expect_state(dev, STOP, "after RESUMING -> STOP")


async def _resume_corrupt(dev: RemoteDevice, stream: bytes) -> MigState:
    """Resume ``stream`` with its middle byte flipped: leaving RESUMING must
    fail, leaving the device in ERROR or RESUMING, which is returned."""
    bad = bytearray(stream)
    bad[len(bad) // 2] ^= 0xFF
    await _reach(dev, RESUMING)
    with contextlib.suppress(OSError):          # refusing the data early is fine too
        await dev.write_data(bytes(bad))
    if await _succeeds(dev.set_state(STOP)):
        raise Fail(f"RESUMING -> STOP accepted a stream with byte {len(bad) // 2} flipped")
    state = await dev.state()
    if state not in (ERROR, RESUMING):
        raise Fail(f"the refused RESUMING -> STOP left device_state {state.name}, want ERROR or RESUMING")
    return state


def _plan_length(cur: MigState, new: MigState, flags: int) -> int | None:
    """Arcs from cur to new; None where the kernel answers EINVAL."""
    try:
        return len(fsm.plan(cur, new, flags))
    except InvalidTransition:
        return None


def _states(flags: int) -> list[MigState]:
    return [s for s in MigState if fsm.supports(flags, s)]


# -- v2: device_state --------------------------------------------------------------

async def _lands(dev: RemoteDevice, stream: bytes, cur: MigState, new: MigState) -> None:
    await _reach(dev, cur, stream=stream)
    await dev.set_state(new)
    await _expect_state(dev, new, "after the SET")


async def _refused(dev: RemoteDevice, stream: bytes, cur: MigState, new: MigState) -> None:
    await _reach(dev, cur, stream=stream)
    try:
        await dev.set_state(new)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise Fail(f"refused with {errno.errorcode.get(err.errno, err.errno)}, want EINVAL") from None
    else:
        raise Fail(f"accepted, device_state now {(await dev.state()).name}")
    await _expect_state(dev, cur, "after the refusal")


async def _transitions(ctx: Context, case: Callable, pairs: list[tuple[MigState, MigState]], what: str) -> str:
    async with ctx.open() as dev:
        stream = await ctx.saved_stream(dev)
        problems = []
        for cur, new in pairs:
            problems += await _try(f"{cur.name} -> {new.name}", case(dev, stream, cur, new))
    return _verdict(problems, len(pairs), what)


async def v2_arcs(ctx: Context) -> str:
    return await _transitions(ctx, _lands, sorted(fsm.arcs(ctx.flags)), "single arcs")


async def v2_combinations(ctx: Context) -> str:
    states = _states(ctx.flags)
    pairs = [(a, b) for a in states for b in states if (_plan_length(a, b, ctx.flags) or 0) > 1]
    return await _transitions(ctx, _lands, pairs, "combination transitions")


async def v2_refused(ctx: Context) -> str:
    pairs = [(a, b) for a in _states(ctx.flags) for b in MigState if _plan_length(a, b, ctx.flags) is None]
    return await _transitions(ctx, _refused, pairs, "refused requests")


# -- v2: migration data ---------------------------------------------------------------

async def v2_stream_end(ctx: Context) -> str:
    async with ctx.open() as dev:
        await _reach(dev, STOP_COPY)
        size, total, limit = dev.chunk_size, 0, await _stream_limit(dev)
        for _ in range(MAX_READS):
            piece = await dev.client.mig_data_read(size)
            total += len(piece)
            if len(piece) < size:
                break
            if total > limit:
                raise Fail(f"no short read after {total} bytes")
        after = [len(await dev.client.mig_data_read(size)) for _ in range(3)]
    if any(after):
        raise Fail(f"after the short read that ended {total} bytes, further reads returned {after} bytes")
    return f"{total} bytes, then a short read; 3 more reads empty"


async def _read_refused(dev: RemoteDevice, *path: MigState) -> None:
    await _reach(dev, *path)
    try:
        data = await dev.client.mig_data_read(PAGE_SIZE)
    except OSError:
        return
    raise Fail(f"MIG_DATA_READ answered with {len(data)} bytes")


async def v2_read_outside_saving(ctx: Context) -> str:
    paths = [(s,) for s in _states(ctx.flags) if s not in fsm.SAVING_GROUP] + [(STOP_COPY, STOP)]
    async with ctx.open() as dev:
        problems = []
        for path in paths:
            problems += await _try(" -> ".join(s.name for s in path), _read_refused(dev, *path))
    return _verdict(problems, len(paths), "states")


# -- v1: device_state and the iteration of seed 001 -----------------------------------

def _v1_takes(dev: RemoteDevice) -> list[int]:
    """The low-4-bit values a write may request: NDMA ones only if the
    device took NDMA|RUNNING when opened (RemoteDevice.open asks)."""
    ndma = bool(dev.flags & MigFlags.P2P)
    return [v for v in range(16) if v1_requestable(v) and (ndma or not v & V1.NDMA)]


async def _v1_write(dev: RemoteDevice, start: int, value: int, taken: bool) -> None:
    await dev.reset()
    if start != V1.RUNNING:
        await dev.set("device_state", start)
    before = await dev.get("device_state")
    try:
        await dev.set("device_state", value)
    except OSError as err:
        after = await dev.get("device_state")
        if taken:
            raise Fail(f"refused: {err}") from None
        if after != before:
            raise Fail(f"refused, but device_state went {before:#x} -> {after:#x}") from None
        return
    after = await dev.get("device_state")
    if not taken:
        raise Fail(f"accepted, device_state now {after:#x}")
    if v1_normalize(after) != v1_normalize(value):
        raise Fail(f"accepted, but device_state reads {after:#x}")


async def v1_device_state(ctx: Context) -> str:
    async with ctx.open() as dev:
        taken = _v1_takes(dev)
        refused = [v for v in range(16) if v not in taken]
        cases = [(V1.RUNNING, v, v in taken) for v in range(16)]
        cases += [(start, v, False) for start in taken if start != V1.RUNNING for v in refused]
        problems = []
        for start, value, ok in cases:
            problems += await _try(f"{start:#x} -> {value:#x}", _v1_write(dev, start, value, ok))
    ndma = "NDMA taken" if taken[-1] & V1.NDMA else "NDMA not taken"
    return _verdict(problems, len(cases), f"device_state writes ({ndma})")


async def _v1_stop_copy(dev: RemoteDevice) -> None:
    await dev.reset()
    await dev.set("device_state", V1.SAVING)


async def _v1_buffer(dev: RemoteDevice) -> tuple[int, int]:
    """Start (or continue) an iteration: (data_offset, data_size)."""
    return await dev.get("data_offset"), await dev.get("data_size")


async def _v1_iterations(dev: RemoteDevice) -> AsyncIterator[tuple[int, int]]:
    """Stop-and-copy from a reset: (iteration, pending_bytes) for the first
    V1_ITERATIONS iterations, while pending_bytes > 0."""
    await _v1_stop_copy(dev)
    for k in range(V1_ITERATIONS):
        pending = await dev.get("pending_bytes")
        if not pending:
            return
        yield k, pending


async def v1_pending_poll(ctx: Context) -> str:
    async with ctx.open() as dev:
        await _v1_stop_copy(dev)
        polls = [await dev.get("pending_bytes") for _ in range(5)]
        offset, size = await _v1_buffer(dev)
    if not polls[0]:
        raise Fail("pending_bytes is 0 at the start of stop-and-copy")
    if len(set(polls)) > 1:
        raise Fail(f"in stop-and-copy, with no data read, pending_bytes polled as {polls}")
    if not size:
        raise Fail(f"after polling pending_bytes {polls[0]} five times, the iteration offers no data")
    return f"pending_bytes {polls[0]} five times; then data_offset {offset:#x}, data_size {size}"


async def v1_iteration_stable(ctx: Context) -> str:
    problems, n = [], 0
    async with ctx.open() as dev:
        async for n, _ in _v1_iterations(dev):
            seen = [await _v1_buffer(dev), await _v1_buffer(dev)]
            data = await dev.window_read(*seen[0])
            seen.append(await _v1_buffer(dev))
            if len(set(seen)) > 1:
                problems.append(f"iteration {n}: (data_offset, data_size) read as {seen}")
            if await dev.window_read(*seen[0]) != data:
                problems.append(f"iteration {n}: the data changed when read again")
    return _verdict(problems, n + 1, "iterations")


async def v1_pending_ends_iteration(ctx: Context) -> str:
    problems, n, last = [], 0, None
    async with ctx.open() as dev:
        async for n, pending in _v1_iterations(dev):
            data = await dev.window_read(*await _v1_buffer(dev))
            if last and data == last[1] and pending >= last[0]:
                problems.append(f"iteration {n} offered iteration {n - 1}'s {len(data)} bytes again "
                                f"and pending_bytes stayed {pending}")
            last = (pending, data)
    return _verdict(problems, n + 1, "iterations")


async def v1_stop_copy_end(ctx: Context) -> str:
    async with ctx.open() as dev:
        await _v1_stop_copy(dev)
        first = pending = await dev.get("pending_bytes")
        total = iterations = empty = 0
        while pending:
            iterations += 1
            offset, size = await _v1_buffer(dev)
            await dev.window_read(offset, size)
            total += size
            empty = 0 if size else empty + 1
            if empty > 100 or iterations > MAX_READS or total > 4 * first + STREAM_SLACK:
                raise Fail(f"pending_bytes still {pending} after {iterations} iterations and {total} bytes")
            pending = await dev.get("pending_bytes")
        after = [await dev.get("pending_bytes") for _ in range(2)]
    if any(after):
        raise Fail(f"pending_bytes went back to {after} after reaching 0")
    return f"pending_bytes {first} -> 0 in {iterations} iterations, {total} bytes"


# -- save and resume into the peer --------------------------------------------------------

async def peer_resume(ctx: Context) -> str:
    async with ctx.open() as src, ctx.open(ctx.peer) as dst:
        precopy = bool(src.flags & MigFlags.PRE_COPY)
        stream = await _save(src, RUNNING, precopy)
        await _resume(dst, stream)
        hashes = "state hash not offered by both"
        if await src.client.probe(Feature.QMPMIG_STATE_HASH) and await dst.client.probe(Feature.QMPMIG_STATE_HASH):
            mine, theirs = await src.state_hash(), await dst.state_hash()
            if mine != theirs:
                raise Fail(f"state hashes differ: source {mine.hex()[:16]}..., peer {theirs.hex()[:16]}...")
            hashes = "state hashes equal"
    return f"{len(stream)} bytes {'with' if precopy else 'without'} pre-copy; peer in STOP; {hashes}"


async def peer_corrupt_resume(ctx: Context) -> str:
    async with ctx.open() as src:
        stream = await ctx.saved_stream(src)
    async with ctx.open(ctx.peer) as dst:
        state = await _resume_corrupt(dst, stream)
        await dst.reset()  # the rule: a reset gives RUNNING
        await _expect_state(dst, RUNNING, "peer after DEVICE_RESET")
    return f"byte {len(stream) // 2} of {len(stream)} flipped: refused, peer in {state.name}; reset -> RUNNING"


# -- DMA: logging, and the reference device's ring ------------------------------------------

@contextlib.asynccontextmanager
async def _memory(dev: RemoteDevice, iova: int, size: int) -> AsyncIterator[mmap.mmap]:
    """A memfd of ``size`` bytes, DMA_MAPped read/write at ``iova``."""
    fd = os.memfd_create("qmpmig-check")
    try:
        os.ftruncate(fd, size)
        mem = mmap.mmap(fd, size)
        await dev.client.dma_map(iova, size, fd)
        try:
            yield mem
        finally:
            with contextlib.suppress(OSError):
                await dev.client.dma_unmap(iova, size)
            mem.close()
    finally:
        os.close(fd)


def _report(dev: RemoteDevice) -> Awaitable[bytes]:
    return dev.client.dma_logging_report(RING_IOVA, RING_SIZE, LOG_PAGE)


async def dma_logging(ctx: Context) -> str:
    problems = []
    async with ctx.open() as dev, _memory(dev, RING_IOVA, RING_SIZE):
        if await _succeeds(_report(dev)):
            problems.append("REPORT before START succeeded")
        page_size = await dev.client.dma_logging_start(LOG_PAGE, [(RING_IOVA, RING_SIZE)])
        bitmap = await _report(dev)
        want = dirty_bitmap_size(RING_SIZE, LOG_PAGE)
        if len(bitmap) != want:
            problems.append(f"REPORT bitmap of {len(bitmap)} bytes, want {want}")
        await dev.client.dma_logging_stop()
        if await _succeeds(_report(dev)):
            problems.append("REPORT after STOP succeeded")
    return _judge(problems, f"START (page_size {page_size}), REPORT ({want}-byte bitmap), STOP; "
                            "REPORT refused outside")


@dataclass
class Ring:
    """The reference device's DMA ring, in memory the check mapped."""

    dev: RemoteDevice
    mem: mmap.mmap

    async def reg(self, name: str) -> int:
        return await read_register(self.dev.client, name)

    async def set_reg(self, name: str, value: int) -> None:
        await write_register(self.dev.client, name, value)

    async def dirty(self) -> set[int]:
        """REPORT (and clear): the dirty pages, counted from RING_IOVA."""
        return set(bitmap_pages(await _report(self.dev)))

    @staticmethod
    def pages(first: int, end: int) -> set[int]:
        """The pages records first..end-1 land in."""
        return {(seq % RING_SLOTS) * records.SIZE // LOG_PAGE for seq in range(first, end)}

    async def dma_runs(self, timeout: float = 2.0) -> None:
        first = await self.reg("dma_seq")
        deadline = time.monotonic() + timeout
        while await self.reg("dma_seq") == first:
            if time.monotonic() > deadline:
                raise Fail(f"the DMA engine wrote no record in {timeout:g} s (dma_seq {first})")
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _ring(ctx: Context) -> AsyncIterator[Ring]:
    """A reset reference device writing records into a mapped ring, with
    DMA logging over it, the engine seen to run."""
    async with ctx.open() as dev, _memory(dev, RING_IOVA, RING_SIZE) as mem:
        ring = Ring(dev, mem)
        for name, value in (("ring_iova", RING_IOVA), ("ring_size", RING_SIZE), ("dma_rate", DMA_RATE)):
            await ring.set_reg(name, value)
        await dev.client.dma_logging_start(LOG_PAGE, [(RING_IOVA, RING_SIZE)])
        await ring.set_reg("ctrl", CTRL_DMA_ENABLE)
        await ring.dma_runs()
        yield ring


async def ref_dma_log(ctx: Context) -> str:
    async with _ring(ctx) as ring:
        await ring.dirty()
        first = await ring.reg("dma_seq")
        await asyncio.sleep(0.25)
        end = await ring.reg("dma_seq")
        dirty = await ring.dirty()
    want = ring.pages(first, end)
    if end == first:
        raise Fail("no record written between the two REPORTs")
    if want - dirty:
        raise Fail(f"records {first}..{end - 1} landed in pages {sorted(want)}; "
                   f"REPORT missed {sorted(want - dirty)}")
    return f"records {first}..{end - 1} in pages {sorted(want)}, all reported"


async def ref_quiesce(ctx: Context) -> str:
    quiet = "RUNNING_P2P" if ctx.protocol == "v2" else "NDMA|RUNNING"
    async with _ring(ctx) as ring:
        await ring.dev.set_state(RUNNING_P2P)       # v1: its twin NDMA|RUNNING
        first, before = await ring.reg("dma_seq"), bytes(ring.mem)
        await ring.dirty()
        await asyncio.sleep(QUIET_SECONDS)
        end, after, dirty = await ring.reg("dma_seq"), bytes(ring.mem), await ring.dirty()
        await ring.dev.set_state(RUNNING)
    during = f"in {quiet} for {QUIET_SECONDS:g} s"
    problems = []
    if end != first:
        problems.append(f"{during}: dma_seq went {first} -> {end}")
    if after != before:
        problems.append(f"{during}: {sum(a != b for a, b in zip(after, before))} bytes of the ring changed")
    if dirty:
        problems.append(f"{during}: pages {sorted(dirty)} reported dirty")
    return _judge(problems, f"{during}: dma_seq stayed {first}, ring unchanged, no page dirty")


async def ref_stop_mmio(ctx: Context) -> str:
    problems = []
    async with _ring(ctx) as ring:
        dev = ring.dev
        await ring.set_reg("scratch", SCRATCH)
        await _walk(dev, RUNNING, STOP)
        for name, reg in REGISTERS.items():
            raw = await dev.client.region_read(PciRegion.BAR0, reg.offset, reg.size)
            if raw != b"\xff" * len(raw):
                problems.append(f"{name} reads {raw.hex()} in STOP")
        for name in ("scratch", "ctrl", "ring_iova"):
            await ring.set_reg(name, 0)
        before = bytes(ring.mem)
        await asyncio.sleep(0.2)
        if bytes(ring.mem) != before:
            problems.append("the ring changed in STOP")
        digest = await dev.state_hash() if ctx.state_hash else None
        stream = await _save(dev, STOP)
        await _resume(dev, stream)
        if digest is not None and await dev.state_hash() != digest:
            problems.append("the state hash changed across saving and resuming itself")
        await _walk(dev, STOP, RUNNING)
        regs = {name: await ring.reg(name) for name in ("scratch", "ctrl", "ring_iova")}
        want = {"scratch": SCRATCH, "ctrl": CTRL_DMA_ENABLE, "ring_iova": RING_IOVA}
        if regs != want:
            problems.append(f"after resuming its own stream, registers {regs}, want {want}")
        problems += await _try("DMA after the resume", ring.dma_runs())
    return _judge(problems, f"{len(REGISTERS)} registers read all ones, writes dropped; "
                            f"resumed its own {len(stream)}-byte stream")


async def ref_records(ctx: Context) -> str:
    async with _ring(ctx) as ring:
        await asyncio.sleep(0.2)
        await ring.set_reg("ctrl", 0)
        written, device_id = await ring.reg("dma_seq"), await ring.reg("device_id")
        errors = records.verify(bytes(ring.mem), device_id, written)
    slots = min(written, RING_SLOTS)
    if errors:
        raise Fail(f"{len(errors)} of {slots} slots wrong: " + "; ".join(errors[:3]))
    return f"{slots} slots hold records up to {written - 1} of device {device_id}"


# -- reset, and malformed messages ----------------------------------------------------------------

async def _reset_from(dev: RemoteDevice, enter: Callable[[], Awaitable[None]] | None) -> None:
    if enter:
        await enter()
    await dev.reset()  # the rule itself: no fallback
    await _expect_state(dev, RUNNING, "after DEVICE_RESET")


async def _v1_enter(dev: RemoteDevice, value: int) -> None:
    await dev.reset()
    await dev.set("device_state", value)


async def reset_everywhere(ctx: Context) -> str:
    async with ctx.open() as dev:
        stream = await ctx.saved_stream(dev)
        if ctx.protocol == "v2":
            cases = [(s.name, functools.partial(_reach, dev, s, stream=stream)) for s in _states(ctx.flags)]
        else:
            cases = [(f"{v:#x}", functools.partial(_v1_enter, dev, v)) for v in _v1_takes(dev)]
        try:
            reached = await _resume_corrupt(dev, stream)
            note = "ERROR via a corrupt resume" if reached is ERROR else "a corrupt resume left RESUMING"
        except Fail as err:
            reached, note = None, f"ERROR not reached: {err}"
        if reached is ERROR:
            cases.insert(0, ("ERROR", None))
        problems = []
        for label, enter in cases:
            problems += await _try(label, _reset_from(dev, enter))
    return _verdict(problems, len(cases), "states") + f"; {note}"


async def _recv(sock: socketlib.socket) -> tuple[tuple[int, ...], bytes]:
    """The next reply on a raw connection: its header fields and payload."""
    loop = asyncio.get_running_loop()

    async def exactly(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            piece = await loop.sock_recv(sock, n - len(buf))
            if not piece:
                raise Fail("the server closed the connection instead of replying")
            buf += piece
        return bytes(buf)

    while True:
        head = HEADER.unpack(await exactly(HEADER.size))
        body = await exactly(max(0, head[2] - HEADER.size))
        if head[3] & codec.TYPE_MASK == HeaderFlags.REPLY:
            return head, body


@contextlib.asynccontextmanager
async def _raw(ctx: Context) -> AsyncIterator[tuple[socketlib.socket, dict]]:
    """A raw connection of its own after VERSION: the socket and the
    server's capabilities; Skip if no server takes one."""
    loop = asyncio.get_running_loop()
    sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    sock.setblocking(False)
    try:
        try:
            ctx.servers.ensure(ctx.socket)
            try:
                await loop.sock_connect(sock, ctx.socket)
            except (ConnectionRefusedError, FileNotFoundError):
                if not ctx.servers.restart(ctx.socket):
                    raise
                await loop.sock_connect(sock, ctx.socket)
        except (OSError, QmpmigError) as err:
            raise Skip(f"needs connections of its own, and the server takes no more ({reason(err)})"
                       f"{ctx.servers.ended(ctx.socket)}") from None
        conn = codec.Connection(codec.Party.CLIENT)
        caps = {"max_msg_fds": 1, "max_data_xfer_size": 1 << 20}
        await loop.sock_sendall(sock, conn.send(codec.Message(1, Command.VERSION, codec.Version(0, 1, caps))))
        head, body = await asyncio.wait_for(_recv(sock), REPLY_TIMEOUT)
        conn.receive_data(HEADER.pack(*head) + body)
        reply = conn.next_event()
        if not isinstance(reply, codec.Message) or not isinstance(reply.payload, codec.Version):
            raise Fail(f"VERSION answered with {reply}")
        yield sock, reply.payload.capabilities
    finally:
        sock.close()
        ctx.servers.left(ctx.socket)


#: label, cmd, payload given the server's max_data_xfer_size.
MALFORMED: tuple[tuple[str, int, Callable[[int], bytes]], ...] = (
    ("unknown command 0xff", 0xFF, lambda limit: b""),
    ("DMA_MAP with 8 bytes of payload", Command.DMA_MAP, lambda limit: bytes(8)),
    ("REGION_READ of max_data_xfer_size + 1", Command.REGION_READ,
     lambda limit: struct.pack("<QII", 0, 0, limit + 1)),
)


async def _malformed(ctx: Context, msg_id: int, cmd: int, payload: Callable[[int], bytes]) -> str:
    async with _raw(ctx) as (sock, caps):
        limit = caps.get("max_data_xfer_size", 1 << 20)
        data = payload(limit if isinstance(limit, int) else 1 << 20)
        frame = HEADER.pack(msg_id, cmd, HEADER.size + len(data), 0, 0) + data
        await asyncio.get_running_loop().sock_sendall(sock, frame)
        (got_id, _, _, flags, error_no), _ = await asyncio.wait_for(_recv(sock), REPLY_TIMEOUT)
    if got_id != msg_id:
        raise Fail(f"the reply has msg_id {got_id:#x}, want {msg_id:#x}")
    if not flags & HeaderFlags.ERROR:
        raise Fail("answered without the Error flag")
    return errno.errorcode.get(error_no, str(error_no))


async def malformed(ctx: Context) -> str:
    """Each message on a connection of its own (the shared one closed
    first): a server of one client may be gone after the first."""
    await ctx.hang_up(ctx.socket)
    problems, answers = [], []
    for n, (label, cmd, payload) in enumerate(MALFORMED):
        try:
            answers.append(await _malformed(ctx, 0x4D00 + n, cmd, payload))
        except Skip as err:
            if not answers and not problems:
                raise
            raise Skip(f"{len(answers)} of {len(MALFORMED)} malformed messages got error replies "
                       f"({', '.join(answers)}){'; ' + '; '.join(problems) if problems else ''}; then: {err}") from None
        except (Fail, OSError, TimeoutError) as err:
            problems.append(f"{label}: {reason(err)}")
    async with ctx.open() as dev:
        problems += await _try("a new client afterwards", asyncio.gather(dev.client.device_info(), dev.state()))
    return _judge(problems, f"{len(MALFORMED)} malformed messages got error replies ({', '.join(answers)}); "
                            "a new client works")


# -- the table ------------------------------------------------------------------------------------

RULES: tuple[Rule, ...] = (
    Rule("v2-arcs", ("v2",),
         "every single arc of the device's flags (fsm.arcs) is accepted and GET returns its end",
         "uAPI §2.2; vfio_main.c arc lists", v2_arcs),
    Rule("v2-combinations", ("v2",),
         "every combination transition (a plan of 2+ arcs) is accepted in one SET and lands on the target",
         "uAPI §2.3; vfio_main.c vfio_mig_get_next_state", v2_combinations),
    Rule("v2-refused", ("v2",),
         "every request the kernel refuses (ERROR, states the flags lack, STOP_COPY -> PRE_COPY*) "
         "fails with EINVAL and leaves device_state unchanged",
         "uAPI §2.3; seed 004", v2_refused),
    Rule("v2-stream-end", ("v2",),
         "in STOP_COPY the data ends for good: after a short read every read returns nothing",
         "uAPI §3 end of stream; seed 004; vfio-user §4 MIG_DATA_READ", v2_stream_end),
    Rule("v2-read-outside-saving", ("v2",),
         "MIG_DATA_READ is refused outside the saving states (and once STOP_COPY -> STOP closed the stream)",
         "vfio-user §4 MIG_DATA_READ; uAPI §3", v2_read_outside_saving),
    Rule("v1-device-state", ("v1",),
         "each of the 16 low-bit device_state values: requestable ones taken (NDMA only if the device "
         "takes it), invalid ones (RESUMING with RUNNING or SAVING, error 6) refused, device_state unchanged",
         "uAPI §1.1-1.2, §1.5; seed 000", v1_device_state),
    Rule("v1-pending-poll", ("v1",),
         "pending_bytes may be polled repeatedly without starting an iteration",
         "seed 001; uAPI §1.4", v1_pending_poll),
    Rule("v1-iteration-stable", ("v1",),
         "data_offset and data_size (and the data) read the same within one iteration",
         "seed 001; uAPI §1.4", v1_iteration_stable),
    Rule("v1-pending-ends-iteration", ("v1",),
         "reading pending_bytes ends the iteration: the next one offers new data",
         "seed 001; uAPI §1.4", v1_pending_ends_iteration),
    Rule("v1-stop-copy-end", ("v1",),
         "in stop-and-copy the stream reaches pending_bytes == 0 and stays there",
         "seed 001; uAPI §1.4", v1_stop_copy_end),
    Rule("peer-resume", ("peer",),
         "a saved stream (with pre-copy if offered) resumes into the peer: RESUMING -> STOP succeeds, "
         "state hashes equal",
         "uAPI §2.2 RESUMING -> STOP, §1.5; seed 000 reference flows", peer_resume),
    Rule("peer-corrupt-resume", ("peer",),
         "a stream with a flipped byte fails leaving RESUMING (ERROR or refusal); reset gives RUNNING",
         "seed 000 (invalid data -> ERROR); seed 003; uAPI §2.2", peer_corrupt_resume),
    Rule("dma-logging", ("dma-logging",),
         "REPORT fails before START and after STOP; START over mapped memory works; "
         "REPORT's bitmap has the right size",
         "uAPI §4 DMA logging; vfio-user §4 DEVICE_FEATURE", dma_logging),
    Rule("ref-dma-log", ("reference", "dma-logging"),
         "the DMA dirty log misses no page the device's records landed in",
         "uAPI §4; PROTOCOL.md DMA engine", ref_dma_log),
    Rule("ref-quiesce", ("reference", "dma-logging", "quiesce"),
         "in RUNNING_P2P (v2) / NDMA|RUNNING (v1) the device does no DMA: dma_seq, ring and dirty log "
         "stay still",
         "seed 000 NDMA; uAPI §1.2, §2.1; PROTOCOL.md DMA engine", ref_quiesce),
    Rule("ref-stop-mmio", ("reference", "dma-logging"),
         "in STOP BAR0 reads return all ones and writes are dropped; the device still migrates afterwards",
         "seeds 003, 004; uAPI §5; PROTOCOL.md BAR0", ref_stop_mmio),
    Rule("ref-records", ("reference", "dma-logging"),
         "the records in memory verify against dma_seq",
         "PROTOCOL.md DMA engine and records", ref_records),
    Rule("reset", (),
         "DEVICE_RESET from every reachable state (ERROR too) returns RUNNING",
         "seed 000 ERROR and reset; uAPI §1.5, §3", reset_everywhere),
    Rule("malformed", (),
         "an unknown command, a truncated payload, a REGION_READ over max_data_xfer_size get error "
         "replies with their msg_id; a new client works afterwards (needs connections of its own)",
         "vfio-user §1 errors, malformed; §2; §6", malformed),
)


async def _run_rule(ctx: Context, rule: Rule) -> Result:
    start = time.monotonic()
    missing = [need for need in rule.needs if need not in ctx.facts]
    if missing:
        return Result(rule.id, SKIP, rule.text, rule.source, "; ".join(NEEDS[need] for need in missing), 0.0)
    case = [""]
    CASE.set(case)
    ended = len(ctx.servers.endings.get(ctx.socket, ()))
    try:
        status, detail = PASS, await asyncio.wait_for(rule.check(ctx), RULE_TIMEOUT)
    except Fail as err:
        status, detail = FAIL, str(err)
    except Skip as err:
        status, detail = SKIP, str(err)
    except TimeoutError:
        status, detail = FAIL, f"no verdict within {RULE_TIMEOUT:g} s" + (f" (in {case[0]})" if case[0] else "")
    except Exception as err:                # a checker reports, whatever the device does
        status, detail = FAIL, f"{type(err).__name__}: {reason(err)}" + (f" (in {case[0]})" if case[0] else "")
    conn = ctx._connections.get(ctx.socket)
    ctx.servers.settle(ctx.socket, lost=conn is None or conn.device is None or conn.device.client.closed.is_set())
    if died := ctx.servers.endings.get(ctx.socket, [])[ended:]:
        status = FAIL
        detail = f"{detail}; the server died in this rule, first at {case[0] or 'its start'}: {died[0]}" + (
            f" ({len(died) - 1} more times)" if len(died) > 1 else "")
    return Result(rule.id, status, rule.text, rule.source, detail, round(time.monotonic() - start, 3))


async def check_all(ctx: Context, rules: tuple[Rule, ...] = RULES,
                    each: Callable[[Result], None] | None = None) -> list[Result]:
    """Every rule in turn; ``each`` is shown each result as it is decided."""
    results = []
    for rule in rules:
        results.append(await _run_rule(ctx, rule))
        if each:
            each(results[-1])
    return results


async def run(socket: str, peer: str | None = None, protocol: str | None = None,
              server_cmd: str | None = None, each: Callable[[Result], None] | None = None) -> list[Result]:
    """Probe the device (CheckError if it cannot be used), then check every
    rule; ``server_cmd`` (with {sock}) starts the servers."""
    ctx = await Context.probe(socket, peer, protocol, Servers(server_cmd))
    try:
        return await check_all(ctx, each=each)
    finally:
        await ctx.close()


# -- the command ------------------------------------------------------------------------------------

def _describe(ctx: Context) -> str:
    flags = "|".join(f.name for f in MigFlags if ctx.flags & f)
    return f"{ctx.socket}: {ctx.protocol}, flags {flags}, offers {', '.join(sorted(ctx.facts))}"


WIDTH = max(len(rule.id) for rule in RULES)


def row(r: Result) -> str:
    return f"{r.status:4}  {r.id:<{WIDTH}}  {r.text}  [{r.source}]  {r.detail} ({r.seconds:.2f} s)"


def totals(results: list[Result]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    total = sum(r.seconds for r in results)
    return (f"{len(results)} rules: {counts[PASS]} pass, {counts[FAIL]} fail, {counts[SKIP]} skipped "
            f"({total:.1f} s)")


def table(results: list[Result]) -> str:
    return "\n".join([*map(row, results), totals(results)])


async def _command(args, each: Callable[[Result], None] | None) -> tuple[Context, list[Result]]:
    with tempfile.TemporaryDirectory(prefix="qmpmig-check-") as tmp:
        socket, peer = args.socket, args.peer
        if args.server_cmd:
            socket = socket or os.path.join(tmp, "device.sock")
            peer = peer or os.path.join(tmp, "peer.sock")
        ctx = await Context.probe(socket, peer, args.protocol, Servers(args.server_cmd))
        if each:
            print(_describe(ctx), flush=True)
        try:
            return ctx, await check_all(ctx, each=each)
        finally:
            await ctx.close()


def command(args) -> int:
    """``qmpmig check``: 0 if every rule passes, 1 if one fails, 2 if the
    device or peer cannot be used."""
    if not (args.socket or args.server_cmd):
        print("qmpmig check: give --socket, or --server-cmd to start the server", file=sys.stderr)
        return 2
    each = None if args.json else lambda r: print(row(r), flush=True)
    try:
        ctx, results = asyncio.run(_command(args, each))
    except CheckError as err:
        print(f"qmpmig check: {err}", file=sys.stderr)
        return 2
    failed = any(r.status == FAIL for r in results)
    if args.json:
        device = {"socket": ctx.socket, "peer": ctx.peer, "protocol": ctx.protocol, "flags": int(ctx.flags),
                  "offers": sorted(ctx.facts), "server_cmd": args.server_cmd}
        json.dump({"device": device, "passed": not failed,
                   "results": [dataclasses.asdict(r) for r in results]}, sys.stdout, indent=1)
        print()
    else:
        print(totals(results))
    return 1 if failed else 0
