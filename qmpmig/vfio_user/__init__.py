"""vfio-user (QEMU docs/interop/vfio-user.rst), the protocol between QEMU
and a device living in another process.

:mod:`.wire` is the sans-IO codec: bytes and fds in, messages out, and back.
Sockets and asyncio stay in the transport above it.
"""
