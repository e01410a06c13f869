"""The transport fails fast: a reply that cannot be decoded fails its
request at once, and a connection that closes fails every pending request
at once, each with the reason (real UNIX sockets, a peer written by hand)."""

import asyncio
import socket
import struct
import time

import pytest

from qmpmig.errors import DeviceError, Disconnected
from qmpmig.vfio_user import codec
from qmpmig.vfio_user.codec import HEADER, Command
from qmpmig.vfio_user.transport import Endpoint


async def pair() -> tuple[Endpoint, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    endpoint = Endpoint(ours, codec.Party.CLIENT)
    endpoint.start()
    theirs.setblocking(False)
    return endpoint, theirs


async def read_request(sock: socket.socket) -> tuple[int, int]:
    loop = asyncio.get_running_loop()
    head = await loop.sock_recv(sock, HEADER.size)
    msg_id, cmd, size, _, _ = HEADER.unpack(head)
    if size > HEADER.size:
        await loop.sock_recv(sock, size - HEADER.size)
    return msg_id, cmd


async def test_a_malformed_reply_fails_its_request_at_once():
    endpoint, peer = await pair()
    try:
        request = asyncio.create_task(endpoint.request(Command.MIG_DATA_READ, codec.MigDataRead(8, 16)))
        msg_id, cmd = await read_request(peer)
        # size 16 with 3 bytes of data: short, not tolerated.
        body = struct.pack("<II", 8, 16) + b"abc"
        t0 = time.monotonic()
        await asyncio.get_running_loop().sock_sendall(peer, HEADER.pack(msg_id, cmd, 16 + len(body), 1, 0) + body)
        with pytest.raises(DeviceError, match="malformed reply") as err:
            await asyncio.wait_for(request, 5)
        assert time.monotonic() - t0 < 0.5 and not isinstance(err.value, Disconnected)
        assert not endpoint.closed.is_set()     # the framing held: the connection goes on
    finally:
        await endpoint.close()
        peer.close()


async def test_a_closed_connection_fails_every_pending_request_at_once():
    endpoint, peer = await pair()
    try:
        requests = [asyncio.create_task(endpoint.request(Command.DEVICE_RESET, codec.Empty())) for _ in range(3)]
        for _ in requests:
            await read_request(peer)
        await asyncio.get_running_loop().sock_sendall(peer, HEADER.pack(0, Command.DEVICE_RESET, 16, 1, 0)[:9])
        t0 = time.monotonic()
        peer.close()
        results = await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), 5)
        assert time.monotonic() - t0 < 0.5
        assert all(isinstance(r, Disconnected) and "the peer closed the connection" in str(r) for r in results)
    finally:
        await endpoint.close()
