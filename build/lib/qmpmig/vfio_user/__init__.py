"""vfio-user (QEMU docs/interop/vfio-user.rst), the protocol between QEMU
and a device living in another process.

:mod:`.uapi` holds the VFIO uAPI numbers and layouts both ends use;
:mod:`.codec` is the sans-IO codec (bytes and fds in, messages out, and
back); :mod:`.transport` moves them over a UNIX socket with asyncio, under
:mod:`.client` and :mod:`.server`.
"""
