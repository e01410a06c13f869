#!/usr/bin/env python3
"""Fuzz qmpmig's parsers and its device with hostile input, and count.

Targets (``--target``, repeatable; all by default):

- ``server``: the reference device's vfio-user server (its real
  DeviceService and ServerEndpoint, over a real socketpair, in this
  process for speed).  Each case opens a v1 or v2 device, negotiates, and
  sends a sequence of frames: every client message of the protocol
  (DMA_MAP with a real memfd), device_state changes of both protocols
  (v2 DEVICE_FEATURE SET, v1 region writes), region and migration data
  reads and writes at random places and sizes, each possibly mutated
  (bytes flipped, msg_size or argsz changed, payload cut or extended,
  command or flags replaced).  Every frame the server can frame must be
  answered (a reply of its msg_id, or an error reply) within a second;
  an exception escaping the server, or a hang, is a failure.
- ``client``: the client's codec fed every server message of the
  protocol, mutated and cut at random places: a malformed reply from a
  hostile device must come out as a BadMessage or a ProtocolError, never
  as any other exception.
- ``stream``: the device stream between two reference devices: a real
  stop-copy stream, flipped, truncated, its chunks reordered, duplicated
  or replayed, written to a RESUMING device: leaving RESUMING must fail
  (ERROR) every time the bytes differ from the source's.

Prints one JSON object: per target the cases run, the inputs sent, how
they were answered, and ``failures`` (each with its seed, to replay with
``--seed S --cases 1``).  ``--cases 100000`` is the long run
(docs/reliability.md); the tests run a short one.
"""

from __future__ import annotations

import argparse
import asyncio
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
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from qmpmig.device.migration import StreamError  # noqa: E402
from qmpmig.device.model import DeviceConfig, ReferenceDevice  # noqa: E402
from qmpmig.device.service import DeviceService  # noqa: E402
from qmpmig.errors import DeviceError, ProtocolError  # noqa: E402
from qmpmig.migration.states import V1, MigState  # noqa: E402
from qmpmig.vfio_user import codec  # noqa: E402
from qmpmig.vfio_user.codec import Command as C, Message  # noqa: E402
from qmpmig.vfio_user.server import ServerEndpoint  # noqa: E402
from qmpmig.vfio_user.uapi import DmaFlags, Feature, FeatureFlags  # noqa: E402

STATE_SIZE = 64 << 10
#: Seconds the server has to answer one frame.
ANSWER_WITHIN = 1.0


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
        (Message(msg_id, C.DMA_MAP, codec.DmaMap(DmaFlags.READ | DmaFlags.WRITE, 0, iova, size)),
         (memfd,)),
        (Message(msg_id, C.DMA_UNMAP, codec.DmaUnmap(24, 0, iova, size)), ()),
        (Message(msg_id, C.DEVICE_RESET, codec.Empty()), ()),
        (Message(msg_id, C.DEVICE_FEATURE, codec.DeviceFeature(16, FeatureFlags.GET | feature)), ()),
        (Message(msg_id, C.DEVICE_FEATURE, codec.DeviceFeature(16, FeatureFlags.PROBE | FeatureFlags.SET | feature)),
         ()),
        (Message(msg_id, C.MIG_DATA_READ, codec.MigDataRead(8 + count, count)), ()),
        (Message(msg_id, C.MIG_DATA_WRITE, codec.MigDataWrite(8 + count, count, rng.randbytes(count))), ()),
    ]
    if v1:   # the v1 migration region's device_state (qmpmig/device/v1region.py: offset 0)
        choices.append((Message(msg_id, C.REGION_WRITE, codec.RegionAccess(0, 9, 4, struct.pack("<I", v1_state))),
                        ()))
    else:
        data = codec.MigDeviceStateData(state, 0).pack()
        choices.append((Message(msg_id, C.DEVICE_FEATURE, codec.DeviceFeature(
            16 + len(data), FeatureFlags.SET | Feature.MIG_DEVICE_STATE, data)), ()))
    return [rng.choice(choices)]


async def server_case(seed: int, stats: Counter) -> str | None:
    """One connection's worth of hostile frames; a failure's description, or None."""
    rng = random.Random(seed)
    v1 = rng.random() < 0.3
    device = ReferenceDevice(DeviceConfig(state_size=STATE_SIZE, migration="v1" if v1 else "v2",
                                          dma_rate=0, mutate_rate=0))
    service = DeviceService(device)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    caps = {"max_msg_fds": 8, "max_data_xfer_size": codec.QMPMIG_MAX_DATA_XFER}
    endpoint = ServerEndpoint(theirs, service, caps, max_data_xfer_size=codec.QMPMIG_MAX_DATA_XFER)
    service.attach(endpoint)
    endpoint.start()
    memfd = os.memfd_create("fuzz-guest")
    os.ftruncate(memfd, 1 << 20)
    ours.setblocking(False)
    loop = asyncio.get_running_loop()
    conn = codec.Connection(codec.Party.CLIENT, max_msg_fds=8)
    try:
        frames = [(conn.send(Message(0, C.VERSION, codec.Version(0, 1, {"capabilities": {
            "max_msg_fds": 8, "max_data_xfer_size": codec.QMPMIG_MAX_DATA_XFER}}))), ())]
        for msg_id in range(1, rng.randint(2, 16)):
            for msg, fds in client_messages(rng, v1, msg_id, memfd):
                try:
                    raw = conn.send(msg)
                except ProtocolError:
                    continue
                frames.append((mutate(rng, raw) if rng.random() < 0.5 else raw, fds))
        for raw, fds in frames:
            msg_id, _, size, flags, _ = codec.HEADER.unpack_from(raw)
            stats["frames"] += 1
            if fds:
                socket.send_fds(ours, [raw], list(fds))
            else:
                await loop.sock_sendall(ours, raw)
            if not 16 <= size <= codec.Connection(codec.Party.SERVER).max_message_size or size != len(raw):
                stats["unframeable"] += 1
                return None             # the server may close; nothing more to ask of this connection
            if flags & codec.HeaderFlags.NO_REPLY or flags & codec.TYPE_MASK:
                # Not a command that wants an answer: whatever comes of it
                # (an error reply, or nothing) is skipped below.
                stats["no_reply"] += 1
                continue
            try:
                answer = await asyncio.wait_for(_reply_to(loop, ours, conn, msg_id, stats), ANSWER_WITHIN)
            except asyncio.TimeoutError:
                return f"no answer to frame {raw[:32].hex()} within {ANSWER_WITHIN} s"
            if answer is None:
                stats["hung_up"] += 1
                return None
            # An error reply to a command no client sends, or none knows,
            # reads as a BadMessage to qmpmig's strict client: answered all the same.
            stats["error_replies_to_unknown" if isinstance(answer, codec.BadMessage) else
                  "error_replies" if answer.error_no or answer.payload is None else "replies"] += 1
    finally:
        ours.close()
        os.close(memfd)
        await endpoint.close()
        service.detach()
        device.reset()
        if service.v1:
            service.v1.close()
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


def client_case(seed: int, stats: Counter) -> str | None:
    """Server messages, bent and cut anywhere, into the client's codec."""
    rng = random.Random(seed)
    sender = codec.Connection(codec.Party.SERVER)
    samples = [codec.reply_to(Message(7, C.REGION_READ, codec.RegionAccess(0, 0, 4)), codec.RegionAccess(0, 0, 4, b"abcd")),
               codec.reply_to(Message(8, C.DEVICE_GET_INFO, codec.DeviceInfo(16, 0, 0, 0)), codec.DeviceInfo(16, 3, 9, 5)),
               codec.reply_to(Message(9, C.MIG_DATA_READ, codec.MigDataRead(8 + 16, 16)),
                              codec.MigDataRead(8 + 3, 3, b"xyz")),
               codec.reply_to(Message(10, C.DEVICE_FEATURE, codec.DeviceFeature(16, FeatureFlags.GET | Feature.MIGRATION)),
                              codec.DeviceFeature(24, FeatureFlags.GET | Feature.MIGRATION, bytes(8))),
               codec.error_reply(Message(11, C.DMA_MAP, codec.DmaMap(0, 0, 0, 1)), errno.EINVAL),
               Message(12, C.DMA_WRITE, codec.DmaAccess(0x1000, 4, b"1234")),
               Message(13, C.QMPMIG_PAGE_REQUEST, codec.PageRequest(1, 0x1000, 1))]
    stream = b"".join(mutate(rng, sender.send(rng.choice(samples))) for _ in range(rng.randint(1, 8)))
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


def stream_case(seed: int, stats: Counter) -> str | None:
    """A real stop-copy stream, damaged, into a RESUMING device."""
    rng = random.Random(seed)
    src = ReferenceDevice(DeviceConfig(state_size=STATE_SIZE, dma_rate=0, mutate_rate=0, device_id=1))
    dst = ReferenceDevice(DeviceConfig(state_size=STATE_SIZE, dma_rate=0, mutate_rate=0, device_id=1))
    src.set_v2(MigState.STOP)
    src.set_v2(MigState.STOP_COPY)
    good = b""
    while piece := src.saver.read(1 << 16):
        good += bytes(piece)
    data = bytearray(good)
    how = rng.randrange(5)
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
    dst.set_v2(MigState.STOP)
    dst.set_v2(MigState.RESUMING)
    try:
        for pos in range(0, len(data), 4096):
            dst.loader.write(data[pos:pos + 4096])
        dst.set_v2(MigState.STOP)
    except (StreamError, DeviceError, OSError):
        stats["refused"] += 1
        return None if data != good else "the source's own stream was refused"
    stats["accepted"] += 1
    return None if data == good else f"a damaged stream was accepted ({['flip', 'cut', 'reorder', 'dup', 'replay'][how]})"


def open_fds() -> int:
    """This process's open fds: a case leaves as many as it found."""
    return len(os.listdir("/proc/self/fd"))


async def run_async(case, seeds: range, stats: Counter, failures: list) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: failures.append(
        {"seed": None, "failure": f"unhandled: {context.get('exception') or context.get('message')}"}))
    for seed in seeds:
        stats["cases"] += 1
        fds = open_fds()
        try:
            failure = await asyncio.wait_for(case(seed, stats), 30)
        except Exception as err:        # an exception out of the server is a failure
            failure = f"{type(err).__name__}: {err}"
        if not failure and (leaked := open_fds() - fds):
            failure = f"{leaked} fds left open after the case"
        if failure:
            failures.append({"seed": seed, "failure": failure})


TARGETS = {"server": server_case, "client": client_case, "stream": stream_case}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", choices=sorted(TARGETS))
    p.add_argument("--cases", type=int, default=1000, help="cases per target (default %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="the first case's seed")
    args = p.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    result = {"ok": True}
    for name in args.target or sorted(TARGETS):
        stats, failures = Counter(), []
        seeds = range(args.seed, args.seed + args.cases)
        t0 = time.monotonic()
        if name == "server":
            asyncio.run(run_async(server_case, seeds, stats, failures))
        else:
            for seed in seeds:
                stats["cases"] += 1
                try:
                    failure = TARGETS[name](seed, stats)
                except Exception as err:
                    failure = f"{type(err).__name__}: {err}"
                if failure:
                    failures.append({"seed": seed, "failure": failure})
        result[name] = {**stats, "seconds": round(time.monotonic() - t0, 1), "failures": failures[:20],
                        "failure_count": len(failures)}
        result["ok"] = result["ok"] and not failures
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
