"""qmpmig.qemu.channel: the migration stream qmpmig opens for the source
QEMU, on real sockets (the e2e tests migrate over it; the link cut in
switchover, tests/test_libvirt_e2e.py, is where its shutdown matters)."""

import socket

import pytest

from qmpmig.qemu import channel


@pytest.mark.parametrize("uri, expected", [
    ("unix:/run/mig.sock", (socket.AF_UNIX, "/run/mig.sock")),
    ("tcp:10.0.0.2:4444", (socket.AF_INET, ("10.0.0.2", 4444))),
    ("tcp:[fd00::2]:4444", (socket.AF_INET6, ("fd00::2", 4444))),
    ("tcp:host:", None), ("tcp:4444", None), ("unix:", None), ("exec:cat > /x", None), ("rdma:h:1", None),
])
def test_the_uris_qmpmig_opens_itself(uri, expected):
    assert channel.address(uri) == expected


async def test_a_tcp_stream_bounds_unacknowledged_data_and_its_shutdown_ends_the_other_descriptor():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stream = await channel.Stream.connect(f"tcp:127.0.0.1:{port}")
    peer, _ = listener.accept()
    try:
        assert stream.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == channel.USER_TIMEOUT * 1000
        assert stream.sock.getblocking()
        # What QEMU holds after getfd is another descriptor of the same socket.
        qemus = socket.socket(fileno=socket.dup(stream.fileno()))
        stream.shutdown()
        with pytest.raises(BrokenPipeError):
            qemus.sendall(b"x" * (1 << 20))
        assert peer.recv(1) == b""
        qemus.close()
    finally:
        stream.close()
        peer.close()
        listener.close()


async def test_a_unix_stream_and_nobody_listening(tmp_path):
    path = tmp_path / "mig.sock"
    with pytest.raises(OSError):
        await channel.Stream.connect(f"unix:{path}")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    stream = await channel.Stream.connect(f"unix:{path}")
    peer, _ = listener.accept()
    stream.sock.sendall(b"QEVM")
    assert peer.recv(4) == b"QEVM"
    for s in (stream, peer, listener):
        s.close()
    assert await channel.Stream.connect("exec:true") is None
