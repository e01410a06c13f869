"""Fuzz qmpmig's parsers, its client and its device with hostile input, and count.

Targets (``scripts/fuzz --target``, repeatable; all by default):

- ``server``: the reference device's vfio-user server (its real
  DeviceService and ServerEndpoint, over a real socketpair, in this
  process for speed).  Each case opens a v1 or v2 device, takes it to a
  random device_state, negotiates, and sends a sequence of frames: every
  client message of the protocol (DMA_MAP with a real memfd),
  device_state changes of both protocols (v2 DEVICE_FEATURE SET, v1
  region writes), region and migration data reads and writes at random
  places and sizes, each possibly mutated (bytes flipped, msg_size or
  argsz changed, payload cut or extended, command or flags replaced); a
  tenth of the cases end with half a frame, its fd with it, and a hang-up.
  Every frame the server can frame must be answered (a reply of its
  msg_id, or an error reply) within ANSWER_WITHIN; an exception escaping the
  server, a handler raising anything but qmpmig's own errors, a hang, or
  an fd left open is a failure.
- ``client``: (1) the client's codec fed every server message of the
  protocol, mutated and cut at random places: a BadMessage or a
  ProtocolError, never another exception; (2) the controller's device
  (``RemoteDevice.open`` and its calls, v1 and v2, the real Client) against
  a hostile device: a real reference device behind a server that bends its
  replies (mutated, cut, the msg_id or the fd swapped, garbage, doubled,
  unasked-for commands first, hang-ups).  Every call must return or raise
  a :class:`~qmpmig.errors.QmpmigError` within CALL_WITHIN, and leave no
  fd open.
- ``stream``: the device stream between two reference devices: a real
  stop-copy stream, flipped, truncated, its chunks reordered, duplicated
  or replayed, written to a RESUMING device: leaving RESUMING must fail
  (ERROR) every time the bytes differ from the source's.  A sixth of the
  cases forge the register chunk (hostile JSON values, its CRC made good):
  loaded or refused, but never an exception other than a DeviceError.
- ``v1region``: sequences of accesses to a v1 device's migration region
  (``struct vfio_device_migration_info``'s fields and the data window, at
  random offsets and sizes, aligned or not, reads and writes, device_state
  values valid and not) through the real server and the real Client over a
  socketpair: every access answered, by a reply of the size asked or an
  error reply, within ANSWER_WITHIN.  A third of the cases follow the v1 save
  protocol (pre-copy or not, harmless accesses between its steps) and load
  what they read into a RESUMING device, which must leave RESUMING with the
  source's state hash.

Prints one JSON object: per target the cases run, the inputs sent, how
they were answered, and ``failures`` (each with its seed, to replay with
``--seed S --cases 1``).  ``--cases 100000`` is the long run
(docs/reliability.md); the tests run a short one.  ``--engine atheris``
runs the coverage-guided targets of :mod:`qmpmig.tools.fuzz_atheris`.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import errno
import json
import logging
import os
import random
import socket
import struct
import sys
import time
from collections import Counter

from ..controller.devices import RemoteDevice
from ..device import savestream
from ..device.model import DeviceConfig, ReferenceDevice
from ..device.service import MIGRATION_REGION, DeviceService
from ..device.v1region import DATA_OFFSET, REGION_SIZE, WINDOW
from ..errors import DeviceError, Disconnected, ErrorReply, ProtocolError, QmpmigError
from ..migration.states import V1, MigState
from ..vfio_user import codec
from ..vfio_user.client import Client
from ..vfio_user.codec import Command as C, Message
from ..vfio_user.server import ServerEndpoint
from ..vfio_user.uapi import MIGRATION_INFO, DmaFlags, Feature, FeatureFlags

STATE_SIZE = 64 << 10
#: 4 pages: a whole stream fits an atheris input, and a v1region case's
#: round trips (one per access) stay few.
SMALL_STATE = 4 * 4096
#: Seconds the server has to answer one frame, and a call of the
#: controller's device to return or fail: a hang never ends; the bound is
#: generous because long runs share two CPUs at nice 19 (at 1 s, 4 of
#: 2,000 v1region cases timed out under load and passed alone).
ANSWER_WITHIN = CALL_WITHIN = 5.0
#: What the reference device offers (serve_unix's default).
CAPS = {"max_msg_fds": 8, "max_data_xfer_size": codec.QMPMIG_MAX_DATA_XFER}


class Failure(Exception):
    """What a case found: its message is the failure's description."""


def mutate(rng: random.Random, frame: bytes) -> bytes:
    """One of the ways a hostile peer bends a frame; the header's msg_size
    is kept framed (16 .. len) unless the mutation is about it."""
    data = bytearray(frame)
    how = rng.randrange(7)
    if how == 0 and len(data) > 16:                      # flip bytes of the payload
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(16, len(data))] ^= 1 << rng.randrange(8)
    elif how == 1 and len(data) > 16:                    # cut the payload
        data = data[:rng.randrange(16, len(data))]
    elif how == 2:                                       # extend it
        data += rng.randbytes(rng.randint(1, 64))
    elif how == 3:                                       # another command
        struct.pack_into("<H", data, 2, rng.choice([*map(int, C), 0, 14, 99, 0xFFFF]))
    elif how == 4:                                       # other flags, or an errno on a command
        struct.pack_into("<II", data, 8, rng.getrandbits(32), rng.choice([0, 0, rng.getrandbits(32)]))
    elif how == 5 and len(data) >= 20:                   # argsz (the first payload word) bent
        struct.pack_into("<I", data, 16, rng.choice([0, 1, 8, 0xFFFFFFFF, rng.getrandbits(32)]))
    elif how == 6:                                       # random bytes after a good header
        data = data[:16] + rng.randbytes(rng.randint(0, 96))
    if how in (1, 2, 6):
        struct.pack_into("<I", data, 4, len(data))
    return bytes(data)


def open_fds() -> int:
    """This process's open fds: a case leaves as many as it found."""
    return len(os.listdir("/proc/self/fd"))


class HandlerExceptions(logging.Handler):
    """Exceptions a command handler raised (Endpoint._serve logs them with
    their traceback and answers EIO, or their errno): one that is not
    qmpmig's own (errors.py) is a bug the fuzzing counts as a failure."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.seen: list[type[BaseException]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[0]:
            self.seen.append(record.exc_info[0])

    @contextlib.contextmanager
    def installed(self):
        logger = logging.getLogger("qmpmig.vfio_user")
        level, propagate = logger.level, logger.propagate
        logger.addHandler(self)
        logger.setLevel(logging.ERROR)
        logger.propagate = False
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate

    def verdict(self, stats: Counter) -> str | None:
        """Counts what was raised since the last verdict; a failure if any is not qmpmig's."""
        seen, self.seen = self.seen, []
        for kind in seen:
            stats[f"handler_raised_{kind.__name__}"] += 1
        foreign = [kind.__name__ for kind in seen if not issubclass(kind, QmpmigError)]
        return f"a handler raised {', '.join(foreign)}" if foreign else None


def reference_device(v1: bool, device_id: int = 1, state_size: int = STATE_SIZE) -> ReferenceDevice:
    """A quiet reference device (no DMA, no mutation): what it saves is what it holds."""
    return ReferenceDevice(DeviceConfig(state_size=state_size, migration="v1" if v1 else "v2",
                                        dma_rate=0, mutate_rate=0, device_id=device_id))


#: v1 device_state values userspace may write (fsm.v1_requestable), and some it may not.
V1_REQUESTABLE = (0, 1, 2, 3, 4, 8, 9, 10, 11, 12)
V1_REFUSED = (5, 6, 7, 13, 14, 15, 16, 0x80000001, 0xFFFFFFFF)


def to_random_state(rng: random.Random, device: ReferenceDevice) -> None:
    """Take a fresh device to a random device_state of its protocol (a v1
    device through 0-3 writes of any requestable value, ERROR included)."""
    with contextlib.suppress(DeviceError):
        if device.config.migration == "v1":
            for _ in range(rng.randrange(4)):
                device.set_v1(rng.choice(V1_REQUESTABLE))
        else:
            device.set_v2(rng.choice([s for s in MigState if s is not MigState.ERROR]))


@contextlib.asynccontextmanager
async def serving(device: ReferenceDevice):
    """``device`` served by the real DeviceService and ServerEndpoint at the
    far end of a socketpair; yields (our end, the endpoint).  Afterwards
    everything is closed and the device is as a fresh open finds it."""
    service = DeviceService(device)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    endpoint = ServerEndpoint(theirs, service, CAPS, max_data_xfer_size=codec.QMPMIG_MAX_DATA_XFER)
    service.attach(endpoint)
    endpoint.start()
    ours.setblocking(False)
    try:
        yield ours, endpoint
    finally:
        ours.close()
        await endpoint.close()
        service.detach()
        if service.v1:
            service.v1.close()


# -- server -----------------------------------------------------------------


def client_messages(rng: random.Random, v1: bool, msg_id: int, memfd: int) -> list[tuple[Message, tuple]]:
    """Well-formed client messages, some that drive the device's state."""
    state = rng.choice(list(MigState))
    region = rng.randrange(11)
    offset = rng.choice([0, 8, 24, 0x10, rng.randrange(1 << 12), rng.getrandbits(64)])
    count = rng.choice([1, 2, 4, 8, rng.randrange(1, 4096)])
    feature = rng.choice(list(Feature))
    v1_state = rng.choice([0, int(V1.RUNNING), int(V1.SAVING), int(V1.SAVING | V1.RUNNING), int(V1.RESUMING),
                           rng.randrange(16)])
    size = rng.choice([1, 4096, 1 << 20, rng.randrange(1, 1 << 16)])
    iova = rng.choice([0, 1 << 20, rng.getrandbits(40) & ~0xFFF])
    choices = [
        (Message(msg_id, C.DEVICE_GET_INFO, codec.DeviceInfo(16, 0, 0, 0)), ()),
        (Message(msg_id, C.DEVICE_GET_REGION_INFO, codec.RegionInfo(32, 0, region, 0, 0, 0)), ()),
        (Message(msg_id, C.DEVICE_GET_IRQ_INFO, codec.IrqInfo(16, 0, rng.randrange(6), 0)), ()),
        (Message(msg_id, C.REGION_READ, codec.RegionAccess(offset, region, count)), ()),
        (Message(msg_id, C.REGION_WRITE, codec.RegionAccess(offset, region, count, rng.randbytes(count))), ()),
        (Message(msg_id, C.DMA_MAP, codec.DmaMap(DmaFlags.READ | DmaFlags.WRITE, 0, iova, size)), (memfd,)),
        (Message(msg_id, C.DMA_UNMAP, codec.DmaUnmap(24, 0, iova, size)), ()),
        (Message(msg_id, C.DEVICE_RESET, codec.Empty()), ()),
        (Message(msg_id, C.DEVICE_FEATURE, codec.DeviceFeature(16, FeatureFlags.GET | feature)), ()),
        (Message(msg_id, C.DEVICE_FEATURE, codec.DeviceFeature(16, FeatureFlags.PROBE | FeatureFlags.SET | feature)),
         ()),
        (Message(msg_id, C.MIG_DATA_READ, codec.MigDataRead(8 + count, count)), ()),
        (Message(msg_id, C.MIG_DATA_WRITE, codec.MigDataWrite(8 + count, count, rng.randbytes(count))), ()),
    ]
    if v1:   # the v1 migration region's device_state (qmpmig/device/v1region.py: offset 0)
        choices.append((Message(msg_id, C.REGION_WRITE, codec.RegionAccess(
            0, MIGRATION_REGION, 4, struct.pack("<I", v1_state))), ()))
    else:
        data = codec.MigDeviceStateData(state, 0).pack()
        choices.append((Message(msg_id, C.DEVICE_FEATURE, codec.DeviceFeature(
            16 + len(data), FeatureFlags.SET | Feature.MIG_DEVICE_STATE, data)), ()))
    return [rng.choice(choices)]


def version_frame(conn: codec.Connection) -> bytes:
    return conn.send(Message(0, C.VERSION, codec.Version(0, 1, {"capabilities": CAPS})))


async def send_frames(sock: socket.socket, frames: list[tuple[bytes, tuple]], stats: Counter) -> str | None:
    """Send each frame to the server at the far end of ``sock`` and hold it
    to its answer: a reply or an error reply of the frame's msg_id within
    ANSWER_WITHIN for every framed command that wants one.  Stops at the
    first frame the server cannot frame, or when it hangs up."""
    loop = asyncio.get_running_loop()
    conn = codec.Connection(codec.Party.CLIENT, max_msg_fds=8)
    max_size = codec.Connection(codec.Party.SERVER).max_message_size
    for raw, fds in frames:
        msg_id, _, size, flags, _ = codec.HEADER.unpack_from(raw)
        stats["frames"] += 1
        if fds:
            socket.send_fds(sock, [raw], list(fds))
        else:
            await loop.sock_sendall(sock, raw)
        if not 16 <= size <= max_size or size != len(raw):
            stats["unframeable"] += 1
            return None             # the server may close; nothing more to ask of this connection
        if flags & codec.HeaderFlags.NO_REPLY or flags & codec.TYPE_MASK:
            # Not a command that wants an answer: whatever comes of it
            # (an error reply, or nothing) is skipped below.
            stats["no_reply"] += 1
            continue
        try:
            answer = await asyncio.wait_for(_reply_to(loop, sock, conn, msg_id, stats), ANSWER_WITHIN)
        except asyncio.TimeoutError:
            return f"no answer to frame {raw[:32].hex()} within {ANSWER_WITHIN} s"
        if answer is None:
            stats["hung_up"] += 1
            return None
        # An error reply to a command no client sends, or none knows,
        # reads as a BadMessage to qmpmig's strict client: answered all the same.
        stats["error_replies_to_unknown" if isinstance(answer, codec.BadMessage) else
              "error_replies" if answer.error_no or answer.payload is None else "replies"] += 1
    return None


async def server_case(seed: int, stats: Counter) -> str | None:
    """One connection's worth of hostile frames; a failure's description, or None."""
    rng = random.Random(seed)
    v1 = rng.random() < 0.3
    device = reference_device(v1, device_id=0)
    to_random_state(rng, device)
    stats[f"from_{device.bits:#x}" if v1 else f"from_{device.device_state.name}"] += 1
    memfd = os.memfd_create("fuzz-guest")
    os.ftruncate(memfd, 1 << 20)
    try:
        async with serving(device) as (ours, endpoint):
            conn = codec.Connection(codec.Party.CLIENT, max_msg_fds=8)
            frames = [(version_frame(conn), ())]
            for msg_id in range(1, rng.randint(2, 16)):
                for msg, fds in client_messages(rng, v1, msg_id, memfd):
                    try:
                        raw = conn.send(msg)
                    except ProtocolError:
                        continue
                    frames.append((mutate(rng, raw) if rng.random() < 0.5 else raw, fds))
            cut_at_end = rng.random() < 0.1
            if failure := await send_frames(ours, frames, stats):
                return failure
            if cut_at_end and not endpoint.closed.is_set():
                # Half a DMA_MAP, its fd with it, and gone: the server must
                # close and let go of the fd.
                raw = conn.send(Message(99, C.DMA_MAP, codec.DmaMap(DmaFlags.READ, 0, 0, 4096)))
                socket.send_fds(ours, [raw[:rng.randrange(1, len(raw))]], [memfd])
                ours.shutdown(socket.SHUT_RDWR)
                try:
                    await asyncio.wait_for(endpoint.closed.wait(), ANSWER_WITHIN)
                except asyncio.TimeoutError:
                    return "the server did not notice the hang-up"
                stats["cut_mid_frame"] += 1
    finally:
        os.close(memfd)
    return None


async def _reply_to(loop, sock: socket.socket, conn: codec.Connection, msg_id: int, stats: Counter):
    """The server's answer to frame ``msg_id`` (answers to earlier frames
    that wanted none are skipped); None if it hung up."""
    while True:
        event = conn.next_event()
        if event is not codec.NEED_DATA:
            if event.reply and event.msg_id == msg_id:
                return event
            stats["skipped"] += 1
            continue
        try:
            data = await loop.sock_recv(sock, 1 << 16)
        except ConnectionError:
            return None
        if not data:
            return None
        conn.receive_data(data)


# -- client -----------------------------------------------------------------


def _server_samples() -> list[Message]:
    """One message of each kind a server sends: replies, an error reply, its commands."""
    return [
        codec.reply_to(Message(7, C.REGION_READ, codec.RegionAccess(0, 0, 4)), codec.RegionAccess(0, 0, 4, b"abcd")),
        codec.reply_to(Message(8, C.DEVICE_GET_INFO, codec.DeviceInfo(16, 0, 0, 0)), codec.DeviceInfo(16, 3, 9, 5)),
        codec.reply_to(Message(9, C.MIG_DATA_READ, codec.MigDataRead(8 + 16, 16)), codec.MigDataRead(8 + 3, 3, b"xyz")),
        codec.reply_to(Message(10, C.DEVICE_FEATURE, codec.DeviceFeature(16, FeatureFlags.GET | Feature.MIGRATION)),
                       codec.DeviceFeature(24, FeatureFlags.GET | Feature.MIGRATION, bytes(8))),
        codec.error_reply(Message(11, C.DMA_MAP, codec.DmaMap(0, 0, 0, 1)), errno.EINVAL),
        Message(12, C.DMA_WRITE, codec.DmaAccess(0x1000, 4, b"1234")),
        Message(13, C.QMPMIG_PAGE_REQUEST, codec.PageRequest(1, 0x1000, 1))]


SERVER_SAMPLES = _server_samples()
#: msg_id -> a well-formed reply, each of another command than the last.
OTHER_REPLIES = (
    lambda msg_id: codec.reply_to(Message(msg_id, C.DEVICE_RESET, codec.Empty()), codec.Empty()),
    lambda msg_id: codec.reply_to(Message(msg_id, C.DEVICE_GET_INFO, codec.DeviceInfo(16, 0, 0, 0)),
                                  codec.DeviceInfo(16, 3, 9, 5)),
    lambda msg_id: codec.reply_to(Message(msg_id, C.REGION_WRITE, codec.RegionAccess(0, 0, 4, b"abcd")),
                                  codec.RegionAccess(0, 0, 4)),
)


def client_codec_case(rng: random.Random, stats: Counter) -> str | None:
    """Server messages, bent and cut anywhere, into the client's codec."""
    sender = codec.Connection(codec.Party.SERVER)
    stream = b"".join(mutate(rng, sender.send(rng.choice(SERVER_SAMPLES))) for _ in range(rng.randint(1, 8)))
    receiver = codec.Connection(codec.Party.CLIENT)
    try:
        pos = 0
        while pos < len(stream):
            step = rng.randint(1, 64)
            receiver.receive_data(stream[pos:pos + step])
            pos += step
            while (event := receiver.next_event()) is not codec.NEED_DATA:
                stats["bad" if isinstance(event, codec.BadMessage) else "messages"] += 1
    except ProtocolError:
        stats["unframeable"] += 1
    except Exception as err:                    # the failure this target looks for
        return f"{type(err).__name__}: {err}"
    return None


async def _send_all(sock: socket.socket, raw: bytes, fds: list[int]) -> None:
    """``raw`` whole, ``fds`` with its first byte."""
    loop = asyncio.get_running_loop()
    if fds:
        while True:
            try:
                sock.sendmsg([raw[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                break
            except BlockingIOError:
                await asyncio.sleep(0.001)
        raw = raw[1:]
    await loop.sock_sendall(sock, raw)


class HostileDevice:
    """A reference device behind a server that bends its replies.

    The answers come from the real DeviceService; with probability
    ``rate`` each reply is bent on the way out.  A bent reply the client
    cannot take for the reply to its request (another msg_id, turned into a
    command, lost in garbage) is followed by a hang-up: the device is gone,
    as the controller's timeout would find it otherwise."""

    BENDS = ("mutated", "cut_then_gone", "gone", "unasked_command_first", "fd_attached",
             "garbage", "doubled", "error_reply", "msg_id", "other_command")

    def __init__(self, rng: random.Random, sock: socket.socket, v1: bool):
        self.rng = rng
        self.sock = sock
        self.device = reference_device(v1)
        self.service = DeviceService(self.device)
        self.conn = codec.Connection(codec.Party.SERVER, max_data_xfer_size=codec.QMPMIG_MAX_DATA_XFER,
                                     max_msg_fds=8)
        self.rate = rng.choice([0.02, 0.05, 0.1, 0.3])
        self.stats: Counter = Counter()

    def close(self) -> None:
        self.sock.close()
        for fd in self.conn.pending_fds:
            os.close(fd)
        self.service.detach()
        if self.service.v1:
            self.service.v1.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            event = self.conn.next_event()
            if event is codec.NEED_DATA:
                try:
                    data, fds, _, _ = await self._recv(loop)
                except ConnectionError:
                    return
                if not data:
                    for fd in fds:
                        os.close(fd)
                    return
                self.conn.receive_data(data, fds)
                continue
            if isinstance(event, codec.BadMessage) or event.reply:
                for fd in event.fds:
                    os.close(fd)
                if isinstance(event, codec.BadMessage) and event.fatal:
                    return
                continue
            if not await self._answer(event):
                return

    async def _recv(self, loop):
        while True:
            try:
                return socket.recv_fds(self.sock, 1 << 20, 8)
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_reader(self.sock.fileno(), lambda: ready.done() or ready.set_result(None))
                try:
                    await ready
                finally:
                    loop.remove_reader(self.sock.fileno())

    def _honest(self, msg: Message) -> tuple[Message, tuple[int, ...]]:
        """The reference device's reply, as its server would send it."""
        if msg.cmd == C.VERSION:
            return codec.reply_to(msg, codec.Version(0, 1, CAPS)), ()
        serve = self.service.commands.get(msg.cmd)
        try:
            if serve is None:
                raise DeviceError(errno.EINVAL, "not served")
            result = serve(msg)
        except (OSError, QmpmigError) as err:
            if msg.cmd != C.DMA_MAP:       # a refused DMA_MAP's fd is closed by the device
                for fd in msg.fds:
                    os.close(fd)
            return codec.error_reply(msg, getattr(err, "errno", None) or errno.EIO), ()
        payload, fds = result if isinstance(result, tuple) else (result, ())
        if msg.cmd != C.DMA_MAP:
            for fd in msg.fds:
                os.close(fd)
        return codec.reply_to(msg, payload, fds=fds), tuple(fds)

    async def _answer(self, msg: Message) -> bool:
        """Answer ``msg``, bent or not; False once the device is gone."""
        reply, fds = self._honest(msg)
        try:
            raw = self.conn.send(reply)
        except ProtocolError:                   # as Endpoint._serve: a reply it cannot send
            raw, fds = self.conn.send(codec.error_reply(msg, errno.EINVAL)), ()
        if self.rng.random() >= self.rate:
            self.stats["honest"] += 1
            await _send_all(self.sock, raw, list(fds))
            return True
        bend = self.rng.choice(self.BENDS)
        self.stats[bend] += 1
        rng, extra = self.rng, []
        if bend == "gone":
            return False
        if bend == "cut_then_gone":
            await _send_all(self.sock, raw[:rng.randrange(1, len(raw))], list(fds))
            return False
        if bend == "mutated":
            raw = mutate(rng, raw)
        elif bend == "unasked_command_first":
            command = rng.choice(SERVER_SAMPLES[5:])
            await _send_all(self.sock, mutate(rng, self.conn.send(command)) if rng.random() < 0.5
                            else self.conn.send(command), [])
        elif bend == "fd_attached":
            extra = [os.memfd_create("fuzz-hostile")]
            os.ftruncate(extra[0], rng.choice([0, 1, 4096]))
            fds = tuple(extra) if fds and rng.random() < 0.5 else fds + tuple(extra)   # swapped or added
        elif bend == "garbage":
            raw = rng.randbytes(rng.randint(16, 64))
        elif bend == "doubled":
            raw += raw
        elif bend == "error_reply":
            raw = self.conn.send(codec.error_reply(msg, rng.choice([0, errno.EINVAL, errno.EIO, 0xFFFFFFFF])))
        elif bend == "other_command":        # a well-formed reply, to another command
            raw, fds = self.conn.send(rng.choice(OTHER_REPLIES)(msg.msg_id)), ()
        elif bend == "msg_id":
            struct.pack_into("<H", raw := bytearray(raw), 0, (msg.msg_id + rng.randint(1, 0xFFFF)) & 0xFFFF)
            raw = bytes(raw)
        try:
            await _send_all(self.sock, raw, list(fds))
        finally:
            for fd in extra:
                os.close(fd)
        return self._delivered(raw, msg.msg_id)

    def _delivered(self, raw: bytes, msg_id: int) -> bool:
        """Whether a strict client takes ``raw`` for the answer to ``msg_id``
        (a reply, or a malformed reply it fails the request with) or loses
        its framing (and the connection); otherwise the reply is lost."""
        reader = codec.Connection(codec.Party.CLIENT, max_data_xfer_size=codec.QMPMIG_MAX_DATA_XFER, max_msg_fds=8)
        reader.receive_data(raw)
        while (event := reader.next_event()) is not codec.NEED_DATA:
            if isinstance(event, codec.BadMessage) and event.fatal or event.reply and event.msg_id == msg_id:
                return True
        self.stats["lost_then_gone"] += 1
        return False


def controller_calls(rng: random.Random, device: RemoteDevice, memfd: int):
    """A random script of what the controller asks of a device, the states
    in a plausible migration order half of the time."""
    client = device.client
    order = [MigState.STOP, MigState.STOP_COPY, MigState.STOP, MigState.RESUMING, MigState.STOP, MigState.RUNNING]
    calls = []
    for step in range(rng.randint(3, 14)):
        target = order[step % len(order)] if rng.random() < 0.5 else rng.choice(list(MigState))
        calls.append(rng.choice([
            ("state", device.state), ("set_state", lambda t=target: device.set_state(t)),
            ("set_state", lambda t=target: device.set_state(t)), ("pending", device.pending),
            ("read_data", device.read_data), ("read_data", device.read_data),
            ("write_data", lambda d=rng.randbytes(rng.choice([1, 64, 4096])): device.write_data(d)),
            ("state_hash", device.state_hash), ("reset", device.reset),
            ("dma_map", lambda: client.dma_map(1 << 20, 4096, memfd)),
            ("dma_logging", lambda: client.dma_logging_start(4096, [(1 << 20, 4096)])),
            ("dma_report", lambda: client.dma_logging_report(1 << 20, 4096)),
            ("irq_info", lambda: client.irq_info(rng.randrange(5))),
            ("region_read", lambda: client.region_read(0, 0, 4)),
        ]))
    return calls


async def bounded(call, stats: Counter, name: str):
    """``call()`` within CALL_WITHIN: its result, or None when it failed
    with one of qmpmig's errors; Failure for a hang or any other exception."""
    try:
        result = await asyncio.wait_for(call(), CALL_WITHIN)
    except asyncio.TimeoutError:
        raise Failure(f"{name}: no return within {CALL_WITHIN} s") from None
    except QmpmigError as err:
        stats["failed_cleanly" if not isinstance(err, Disconnected) else "disconnected"] += 1
        if isinstance(err, Disconnected):
            raise
        return None
    except Exception as err:
        raise Failure(f"{name}: {type(err).__name__}: {err}") from err
    stats["returned"] += 1
    return result


_socket_names = iter(range(1 << 62))


async def hostile_device_case(rng: random.Random, stats: Counter) -> str | None:
    """The controller's device, v1 or v2, against a :class:`HostileDevice`."""
    v1 = rng.random() < 0.3
    path = f"\0qmpmig-fuzz-{os.getpid()}-{next(_socket_names)}"     # abstract: nothing to clean up
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    memfd = os.memfd_create("fuzz-guest")
    os.ftruncate(memfd, 1 << 20)
    hostile = device = None

    async def serve():
        nonlocal hostile
        sock, _ = await loop.sock_accept(listener)
        sock.setblocking(False)
        hostile = HostileDevice(rng, sock, v1)
        await hostile.run()
        hostile.sock.shutdown(socket.SHUT_RDWR)

    server = asyncio.create_task(serve())
    try:
        try:
            device = await bounded(lambda: RemoteDevice.open(path, "v1" if v1 else "v2"), stats, "open")
        except Disconnected:
            device = None
        if device is None:
            stats["open_failed"] += 1
            return None
        stats["opened"] += 1
        for name, call in controller_calls(rng, device, memfd):
            try:
                await bounded(call, stats, name)
            except Disconnected:
                break
    except Failure as failure:
        return str(failure)
    finally:
        if device is not None:
            await device.close()
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await server
        if hostile:
            hostile.close()
            stats.update(hostile.stats)
        listener.close()
        os.close(memfd)
    return None


async def client_case(seed: int, stats: Counter) -> str | None:
    """The client's codec, then the controller's device, against hostile servers."""
    rng = random.Random(seed)
    return client_codec_case(rng, stats) or await hostile_device_case(rng, stats)


# -- stream -----------------------------------------------------------------


def saved_stream(device: ReferenceDevice) -> bytes:
    """A v2 device's whole stop-copy stream."""
    device.set_v2(MigState.STOP)
    device.set_v2(MigState.STOP_COPY)
    good = b""
    while piece := device.saver.read(1 << 16):
        good += bytes(piece)
    return good


def loads(device: ReferenceDevice, data: bytes) -> bool:
    """Whether a v2 device takes ``data`` as its stream: written in RESUMING
    4 KiB at a time, then leaving RESUMING (a refusal is a DeviceError,
    StreamError among them; the device is in ERROR)."""
    device.set_v2(MigState.STOP)
    device.set_v2(MigState.RESUMING)
    try:
        for pos in range(0, len(data), 4096):
            device.loader.write(data[pos:pos + 4096])
        device.set_v2(MigState.STOP)
    except DeviceError:
        return False
    return True


#: Values a forger puts in a register of the REGS chunk.
FORGED_VALUES = (float("inf"), float("nan"), -1, 1 << 70, "x", None, [], {}, 1.5, True)


def forged_case(rng: random.Random, good: bytes, dst: ReferenceDevice, stats: Counter) -> str | None:
    """The REGS chunk rewritten, its CRC made good (savestream: the CRCs
    find damage, not a forger): the device may load it or refuse it, but
    only as a device does (DeviceError, ERROR), never by another exception."""
    out, pos = b"", 0
    while pos < len(good):
        tag, length, arg, _ = savestream.CHUNK.unpack_from(good, pos)
        end = pos + savestream.CHUNK.size + length
        if tag == b"REGS":
            regs = json.loads(good[pos + savestream.CHUNK.size:end])
            if rng.random() < 0.2:
                regs = rng.choice(FORGED_VALUES)
            else:
                regs[rng.choice(sorted(regs))] = rng.choice(FORGED_VALUES)
            out += savestream.encode(tag, arg, json.dumps(regs).encode())
        else:
            out += good[pos:end]
        pos = end
    stats["forged_accepted" if loads(dst, out) else "forged_refused"] += 1
    return None


def stream_case(seed: int, stats: Counter) -> str | None:
    """A real stop-copy stream, damaged, into a RESUMING device."""
    rng = random.Random(seed)
    good = saved_stream(reference_device(False))
    dst = reference_device(False)
    data = bytearray(good)
    how = rng.randrange(6)
    if how == 5:
        return forged_case(rng, good, dst, stats)
    if how == 0:                                             # flipped
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == 1:                                           # truncated
        data = data[:rng.randrange(len(data))]
    else:                                                    # a piece reordered, duplicated or replayed
        cut = sorted(rng.sample(range(1, len(data)), 2))
        a, b, c = data[:cut[0]], data[cut[0]:cut[1]], data[cut[1]:]
        data = [b + a + c, a + b + b + c, a + b + c + b][how - 2]
    data = bytes(data)
    stats["damaged" if data != good else "unchanged"] += 1
    if not loads(dst, data):
        stats["refused"] += 1
        return None if data != good else "the source's own stream was refused"
    stats["accepted"] += 1
    return None if data == good else f"a damaged stream was accepted ({['flip', 'cut', 'reorder', 'dup', 'replay'][how]})"


# -- v1region ---------------------------------------------------------------


async def connected_client(sock: socket.socket) -> Client:
    """The real Client on our end of a socketpair, VERSION negotiated."""
    client = Client(sock)
    client.start()
    try:
        await asyncio.wait_for(client._negotiate(), ANSWER_WITHIN)
    except BaseException:
        await client.close()
        raise
    return client


def need(what: str, value):
    """``value``, which a step of the save protocol must have had; Failure if refused."""
    if value is None:
        raise Failure(f"the save protocol's {what} was refused")
    return value


class RegionAccesses:
    """Accesses to a v1 device's migration region through the real client,
    each held to its answer: a reply (of the size asked, for a read) or an
    error reply within ANSWER_WITHIN.  Refused accesses come out as None."""

    def __init__(self, client: Client, stats: Counter):
        self.client = client
        self.stats = stats

    async def _ask(self, what: str, call, answer=lambda result: result):
        try:
            result = await asyncio.wait_for(call, ANSWER_WITHIN)
        except ErrorReply:
            self.stats["refused"] += 1
            return None
        except asyncio.TimeoutError:
            raise Failure(f"{what}: no answer within {ANSWER_WITHIN} s") from None
        except Exception as err:
            raise Failure(f"{what}: {type(err).__name__}: {err}") from err
        self.stats["answered"] += 1
        return answer(result)

    async def read(self, offset: int, count: int) -> bytes | None:
        data = await self._ask(f"read {offset:#x}+{count}", self.client.region_read(MIGRATION_REGION, offset, count))
        if data is not None and len(data) != count:
            raise Failure(f"read {offset:#x}+{count}: {len(data)} bytes")
        return data

    async def write(self, offset: int, data: bytes) -> bool | None:
        """True, or None if refused."""
        return await self._ask(f"write {offset:#x}+{len(data)}",
                               self.client.region_write(MIGRATION_REGION, offset, data), lambda _: True)

    async def get(self, name: str) -> int | None:
        field = MIGRATION_INFO[name]
        data = await self.read(field.offset, field.size)
        return None if data is None else field.unpack(data)

    async def set(self, name: str, value: int) -> bool | None:
        field = MIGRATION_INFO[name]
        return await self.write(field.offset, field.pack(value))

    async def random_access(self, rng: random.Random) -> None:
        """Any access: a field at its width or not, aligned or not, the data
        window in or across its bounds, beyond the region, device_state
        values of every kind, a reset now and then."""
        field = rng.choice(list(MIGRATION_INFO.values()))
        kind = rng.randrange(7)
        if kind == 0:
            await self.set("device_state", rng.choice(V1_REQUESTABLE + V1_REFUSED))
        elif kind in (1, 2):
            offset = field.offset + rng.choice([0, 0, 0, 1, 2, 3, 4])
            count = rng.choice([field.size, field.size, 1, 2, 4, 8, 16])
            if kind == 1:
                await self.read(offset, count)
            else:
                await self.write(offset, rng.randbytes(count) if count != field.size or rng.random() < 0.5 else
                                 field.pack(rng.choice([0, 1, 4096, WINDOW, WINDOW + 1, (1 << 8 * field.size) - 1])))
        elif kind in (3, 4):
            offset = DATA_OFFSET + rng.choice([0, rng.randrange(WINDOW), WINDOW - rng.randrange(1, 64), WINDOW,
                                               -rng.randrange(1, 16)])
            count = rng.choice([1, 8, 4096, rng.randrange(1, 1 << 16)])
            if kind == 3:
                await self.read(offset, count)
            else:
                await self.write(offset, rng.randbytes(count))
        elif kind == 5:
            offset = rng.choice([rng.randrange(32, DATA_OFFSET), REGION_SIZE, rng.getrandbits(64)])
            count = rng.randint(1, 64)
            if rng.random() < 0.5:
                await self.read(offset, count)
            else:
                await self.write(offset, rng.randbytes(count))
        elif rng.random() < 0.3:
            await self._ask("reset", self.client.reset())

    async def harmless(self, rng: random.Random) -> None:
        """An access the save and resume protocols must shrug off: a
        device_state or reserved read, a field out of its width or
        alignment, a device_state no user may write, the window read,
        beyond the region."""
        self.stats["harmless"] += 1
        kind = rng.randrange(6)
        if kind == 0:
            await self.get(rng.choice(["device_state", "reserved"]))
        elif kind == 1:
            await self.read(rng.choice([1, 2, 3, 5, 6, 7, 9, 12, 17, 20, 25, 28, 32]), rng.choice([1, 2, 4, 8]))
        elif kind == 2:
            if await self.set("device_state", rng.choice(V1_REFUSED)):
                raise Failure("a device_state no user may write was taken")
        elif kind == 3:
            await self.read(DATA_OFFSET + rng.randrange(WINDOW - 64), rng.randint(1, 64))
        elif kind == 4:
            await self.read(rng.choice([REGION_SIZE, rng.getrandbits(63)]), rng.randint(1, 16))
        else:
            await self.write(rng.choice([2, 10, 18, 26]), bytes(4))


async def v1_save(rng: random.Random, region: RegionAccesses, stats: Counter) -> bytes:
    """Seed 001's save protocol (pre-copy half of the time), harmless
    accesses between its steps: the stream read."""
    chunks = []

    async def noise():
        while rng.random() < 0.3:
            await region.harmless(rng)

    async def iterate() -> int:
        """One iteration: pending_bytes, data_offset, data_size, the data
        read in pieces; what pending_bytes said."""
        await noise()
        if not (pending := need("pending_bytes read", await region.get("pending_bytes"))):
            return 0
        await noise()
        offset = need("data_offset read", await region.get("data_offset"))
        size = need("data_size read", await region.get("data_size"))
        pos = 0
        while pos < size:
            await noise()
            count = min(size - pos, rng.choice([size, 4096, rng.randint(512, max(512, size))]))
            chunks.append(need("window read", await region.read(offset + pos, count)))
            pos += count
        return pending

    if rng.random() < 0.5:
        need("SAVING|RUNNING", await region.set("device_state", V1.SAVING | V1.RUNNING))
        stats["precopy"] += 1
        for _ in range(rng.randrange(4)):
            await iterate()
    need("SAVING", await region.set("device_state", V1.SAVING))
    for _ in range(1000):
        if not await iterate():
            break
    else:
        raise Failure("pending_bytes never reached 0")
    await noise()
    need("STOP", await region.set("device_state", 0))
    return b"".join(chunks)


async def v1_load(rng: random.Random, region: RegionAccesses, stream: bytes, stats: Counter) -> None:
    """Seed 001's resume: each piece written at data_offset (in parts),
    committed by writing its length to data_size; then RUNNING."""
    need("RESUMING", await region.set("device_state", V1.RESUMING))
    pos = 0
    while pos < len(stream):
        if rng.random() < 0.3:
            await region.harmless(rng)
        offset = need("data_offset read", await region.get("data_offset"))
        piece = stream[pos:pos + rng.choice([WINDOW, 4096, rng.randint(1, 1 << 16)])]
        done = 0
        while done < len(piece):
            part = piece[done:done + rng.choice([len(piece), 4096, rng.randint(1, len(piece))])]
            need("window write", await region.write(offset + done, part))
            done += len(part)
        need("data_size write", await region.set("data_size", len(piece)))
        pos += len(piece)
    need("leaving RESUMING", await region.set("device_state", V1.RUNNING))
    stats["loaded"] += 1


async def v1region_case(seed: int, stats: Counter) -> str | None:
    """Random accesses, or the save protocol and a load, on v1 devices."""
    rng = random.Random(seed)
    src = reference_device(True, state_size=SMALL_STATE)
    async with serving(src) as (ours, _):
        client = await connected_client(ours)
        region = RegionAccesses(client, stats)
        try:
            if rng.random() >= 1 / 3:
                for _ in range(rng.randint(1, 24)):
                    await region.random_access(rng)
                if (state := await region.get("device_state")) is None:
                    return "device_state read refused"
                stats[f"ended_in_{state:#x}"] += 1
                return None
            stats["saves"] += 1
            stream = await v1_save(rng, region, stats)
            dst = reference_device(True, state_size=SMALL_STATE)
            async with serving(dst) as (dst_ours, _):
                dst_client = await connected_client(dst_ours)
                try:
                    await v1_load(rng, RegionAccesses(dst_client, stats), stream, stats)
                finally:
                    await dst_client.close()
                if dst.state_hash() != src.state_hash():
                    return "the loaded state is not the saved one"
        except Failure as failure:
            return str(failure)
        finally:
            await client.close()
    return None


# -- running ----------------------------------------------------------------


async def run_async(case, seeds: range, stats: Counter, failures: list) -> None:
    """Each seed's case, bounded; an exception out of it, an unhandled one
    in the loop, a handler's foreign exception or an fd left open is a failure."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: failures.append(
        {"seed": None, "failure": f"unhandled: {context.get('exception') or context.get('message')}"}))
    with HandlerExceptions().installed() as raised:
        for seed in seeds:
            stats["cases"] += 1
            fds = open_fds()
            try:
                failure = await asyncio.wait_for(case(seed, stats), 30)
            except Exception as err:        # an exception out of the server is a failure
                failure = f"{type(err).__name__}: {err}"
            failure = failure or raised.verdict(stats)
            if not failure and (leaked := open_fds() - fds):
                failure = f"{leaked} fds left open after the case"
            if failure:
                failures.append({"seed": seed, "failure": failure})


def run_sync(case, seeds: range, stats: Counter, failures: list) -> None:
    for seed in seeds:
        stats["cases"] += 1
        try:
            failure = case(seed, stats)
        except Exception as err:
            failure = f"{type(err).__name__}: {err}"
        if failure:
            failures.append({"seed": seed, "failure": failure})


TARGETS = {"server": server_case, "client": client_case, "stream": stream_case, "v1region": v1region_case}


def run_target(name: str, seeds: range) -> dict:
    """One target's figures: its counters, seconds, failures (the first 20) and their count."""
    stats, failures = Counter(), []
    t0 = time.monotonic()
    case = TARGETS[name]
    if asyncio.iscoroutinefunction(case):
        asyncio.run(run_async(case, seeds, stats, failures))
    else:
        run_sync(case, seeds, stats, failures)
    return {**dict(sorted(stats.items())), "seconds": round(time.monotonic() - t0, 1), "failures": failures[:20],
            "failure_count": len(failures)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["random", "atheris"], default="random",
                   help="seeded random mutation (default), or coverage-guided atheris")
    p.add_argument("--target", action="append", help=f"random: {', '.join(TARGETS)}; atheris: see --engine")
    p.add_argument("--cases", type=int, default=1000, help="cases (atheris: runs) per target (default %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="the first case's seed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    if args.engine == "atheris":
        from .fuzz_atheris import run_targets
        result = run_targets(args.target, args.cases, args.seed)
    else:
        result = {"ok": True}
        for name in args.target or TARGETS:
            if name not in TARGETS:
                p.error(f"no target {name!r}")
            result[name] = run_target(name, range(args.seed, args.seed + args.cases))
            result["ok"] = result["ok"] and not result[name]["failure_count"]
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
