"""One host's libvirt through libvirt-python, the module built against the
host's own libvirt (scripts/setup.sh installs the version ``pkg-config``
reports).  Each call is blocking and runs in a thread of its own, so a
daemon's event loop never waits on libvirt; libvirt's error comes back as
a :class:`LibvirtError` that names the call."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..errors import QmpmigError

#: The URI of the host's own system libvirt.
SYSTEM = "qemu:///system"


class LibvirtError(QmpmigError):
    """libvirt said no, or is not there."""


def module():
    """libvirt-python, or a LibvirtError that says how to get it."""
    try:
        import libvirt
    except ImportError:
        raise LibvirtError("libvirt-python is not installed (scripts/setup.sh installs the version that "
                           "matches this host's libvirt)") from None
    return libvirt


class Libvirt:
    """A connection to one libvirt, opened on first use."""

    def __init__(self, uri: str = SYSTEM):
        self.uri = uri
        self._conn = None

    async def call(self, what: str, fn: Callable, *args):
        """``fn(*args)`` in a thread."""
        lv = module()
        try:
            return await asyncio.to_thread(fn, *args)
        except lv.libvirtError as err:
            raise LibvirtError(f"{what}: {err.get_error_message()}") from None

    async def open(self):
        """A connection of its own (a call that blocks for the length of a
        migration holds no other call up)."""
        return await self.call(f"connecting to {self.uri}", module().open, self.uri)

    async def domain(self, name: str):
        if self._conn is None:
            self._conn = await self.open()
        return await self.call(f"domain {name}", self._conn.lookupByName, name)

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close()
            except module().libvirtError:
                pass
