"""The destination half of a migration driven from another host.

The source host's daemon runs the controller; this host's daemon owns the
destination VM and its devices and does, for an expected migration only
(``expect``), what the controller asks of them over the peer channel:

- ``incoming_qmp``: one of :data:`QMP_COMMANDS` on the destination QEMU;
- ``incoming_watch``: the VM's (run state, migration status) and QEMU's
  event times, answered once they change (a long poll);
- ``incoming_device``: one of :data:`DEVICE_CALLS` on a device; the
  migration data it writes carries a CRC-32, checked before the device
  sees a byte.

Page requests of the destination's devices stay here: this daemon answers
them from its own view of the vCPUs.

What this daemon saw of each such migration (:class:`Arrival`) decides how
it ends it when its peer is lost: before every device here loaded its
state the guest's place is the source, so this side is undone (devices
reset, QEMU ended once it was asked to listen); after, the guest's place
is here, and nothing of it is destroyed (the journal's rule,
qmpmig/daemon/journal.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import QmpmigError
from ..migration.states import MigState
from . import peer

if TYPE_CHECKING:
    from ..controller.side import DeviceEnd, Side

#: What a peer may ask of the destination QEMU: the incoming side of a
#: migration, and nothing that would start a second copy of another guest.
QMP_COMMANDS = frozenset({"migrate-incoming", "migrate-set-capabilities", "migrate-set-parameters",
                          "query-migrate", "query-migrate-capabilities", "query-migrate-parameters",
                          "query-status", "cont", "quit"})


@dataclass
class Arrival:
    """An incoming migration as this daemon saw it driven."""

    #: Its QEMU was asked to listen (migrate-incoming): it may hold a copy
    #: of the guest from then on.
    listening: bool = False
    #: The devices that left RESUMING with their state loaded.
    loaded: set[str] = field(default_factory=set)
    #: Its peer has begun to drive it (a QMP command or a device call):
    #: from then on the peer's silence means it is lost.  (Before, under
    #: libvirt, it may wait long for libvirt to start QEMU here.)
    driven: bool = False

    def committed(self, side: Side) -> bool:
        """Every device here loaded its state: the guest's place is here."""
        return bool(side.devices) and self.loaded >= {end.name for end in side.devices}

    def moved(self, device: str, call: str, before: MigState, after: MigState) -> None:
        """A device call that succeeded: a load (out of RESUMING, not into
        ERROR) counts, a reset undoes it."""
        if call == "reset":
            self.loaded.discard(device)
        elif before is MigState.RESUMING and after not in (MigState.RESUMING, MigState.ERROR):
            self.loaded.add(device)


def describe(end: DeviceEnd) -> dict:
    """A device as a daemon shows it (``status``, and to a peer)."""
    device = end.device
    return {"name": end.name, "protocol": device.protocol, "flags": int(device.flags),
            "offered": int(device.offered), "extensions": sorted(device.extensions),
            "chunk_size": device.chunk_size, "state": end.state.name}


def checked(data: bytes | str, crc: int, what: str) -> bytes:
    """A request's bytes (its payload, or hex), if their CRC-32 is ``crc``."""
    raw = data if isinstance(data, bytes) else bytes.fromhex(data)
    if zlib.crc32(raw) != crc:
        raise QmpmigError(f"CRC-32 {zlib.crc32(raw):#010x} of the bytes, {crc:#010x} claimed: {what}")
    return raw


async def _send(end: DeviceEnd, data: bytes | str, crc: int) -> dict:
    raw = checked(data, crc, f"not given to {end.name}")
    await end.device.send_data(raw)
    return {"sent": len(raw)}


async def _set_state(end: DeviceEnd, state: str) -> dict:
    await end.device.set_state(MigState[state])
    end.state = MigState[state]
    return {"state": state}


async def _state(end: DeviceEnd) -> dict:
    end.state = await end.device.state()
    return {"state": end.state.name}


async def _hash(end: DeviceEnd) -> dict:
    digest = await end.device.state_hash()
    return {"hash": digest and digest.hex()}


async def _reset(end: DeviceEnd) -> dict:
    await end.device.reset()
    return await _state(end)


async def _flush(end: DeviceEnd) -> dict:
    await end.device.flush()
    return {}


async def _describe(end: DeviceEnd) -> dict:
    return describe(end)


#: call -> (its handler, the arguments it takes besides the device).
DEVICE_CALLS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "describe": (_describe, ()),
    "state": (_state, ()),
    "set_state": (_set_state, ("state",)),
    "send_data": (_send, ("data", "crc")),
    "flush": (_flush, ()),
    "state_hash": (_hash, ()),
    "reset": (_reset, ()),
}


async def device_call(side: Side, device: str, call: str, args: dict, arrival: Arrival) -> dict:
    """Call ``call`` on the device named ``device`` of ``side``, noted in ``arrival``."""
    if call not in DEVICE_CALLS:
        raise QmpmigError(f"no device call {call!r}")
    ends = {end.name: end for end in side.devices}
    if device not in ends:
        raise QmpmigError(f"no device {device!r} (there are {', '.join(ends) or 'none'})")
    handler, takes = DEVICE_CALLS[call]
    if missing := [name for name in takes if name not in args]:
        raise QmpmigError(f"{call}: missing {', '.join(missing)}")
    end = ends[device]
    before = end.state
    arrival.driven = True
    try:
        result = await handler(end, **{name: args[name] for name in takes})
    except OSError as err:
        # The device's own refusal (a vfio-user error reply): answered as
        # such, so the source host's controller treats it as it would a
        # device of its own (names the device, reads its state).
        return {"errno": err.errno, "error": err.strerror or str(err)}
    arrival.moved(device, call, before, end.state)
    return result


async def qmp(side: Side, command: str, arguments: dict | None, arrival: Arrival) -> dict:
    """The QMP command on the destination QEMU, noted in ``arrival``."""
    if command not in QMP_COMMANDS:
        raise QmpmigError(f"{command!r} is not a command a peer may give")
    # Noted before it is given: one whose answer is lost may have been taken.
    arrival.listening |= command == "migrate-incoming"
    arrival.driven = True
    return {"return": await side.qmp(command, arguments)}


async def watch(side: Side, since: int, timeout: float) -> dict:
    """The VM as this daemon follows it, once it has changed since update
    ``since`` (or ``timeout`` passed, or QEMU went away)."""
    if side.updates == since and not side.gone:
        with contextlib.suppress(asyncio.TimeoutError):
            await side.next_update(min(timeout, peer.LONG_POLL_MAX))
    state = side.vm
    return {"runstate": state and state.runstate, "status": state and state.status, "updates": side.updates,
            "gone": side.gone, "event_times": dict(side.event_times), "devices": [end.name for end in side.devices]}
