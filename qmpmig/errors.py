"""qmpmig's exceptions: one tree, the type naming the culprit.

::

    QmpmigError
     +-- Refused (ValueError)       a table refuses a request
     |    +-- InvalidTransition     the FSM: no such arc or path (errno EINVAL)
     |    +-- LifecycleRefused      no device_state for this (role, runstate, status)
     +-- ProtocolError              a vfio-user message breaks the protocol (errno)
     |    +-- LocalProtocolError    ... one we were about to send
     |    +-- RemoteProtocolError   ... one the peer sent
     +-- DeviceError (OSError)      a device refused a request; errno as on the wire
     |    +-- ErrorReply            ... in a vfio-user error reply (cmd)
     |    +-- Disconnected          ... the device's connection closed
     |    +-- StreamError           ... migration data the device may not load
     +-- QemuError                  QEMU
     |    +-- QemuGone              the monitor closed: QEMU died or quit
     |    +-- QemuCommandError      a QMP command answered with an error
     |    +-- VmError               a QEMU process the rig started misbehaved
     +-- MigrationFailed            a migration did not complete; the message says why
          +-- EarlySwitchover       QEMU switched over before the grace state

A :class:`DeviceError` is an :class:`OSError` too, as a failed VFIO ioctl
is: ``errno`` is what the device answered (or, from the reference device,
what it answers).  ``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations

import errno as errnos
import os


class QmpmigError(Exception):
    """Root of qmpmig's errors."""


def reason(err: BaseException) -> str:
    """What to say of ``err``: its message, never an empty one (a timeout has none)."""
    if str(err):
        return str(err)
    return "no answer in time" if isinstance(err, TimeoutError) else type(err).__name__


class Refused(QmpmigError, ValueError):
    """A table of the spec refuses the request."""


class InvalidTransition(Refused):
    """A device_state request the kernel answers with -EINVAL."""

    errno = errnos.EINVAL


class LifecycleRefused(Refused):
    """The lifecycle table refuses this (role, runstate, status); ``reason`` says why."""

    def __init__(self, role: str, runstate: str, status: str, reason: str):
        super().__init__(f"{role} ({runstate}, {status}): {reason}")
        self.reason = reason


class ProtocolError(QmpmigError):
    """A message that breaks vfio-user; ``errno`` is the one to answer with."""

    def __init__(self, msg: str, errno: int = errnos.EINVAL):
        super().__init__(msg)
        self.errno = errno


class LocalProtocolError(ProtocolError):
    """We tried to send something invalid."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid."""


class DeviceError(QmpmigError, OSError):
    """A device refused a request; ``errno`` is its answer."""

    def __init__(self, err: int, msg: str):
        OSError.__init__(self, err, msg)


def _strerror(err: int) -> str:
    """os.strerror, for any u32 a peer may put in an error reply (beyond a
    C int, os.strerror raises OverflowError)."""
    try:
        return os.strerror(err)
    except (OverflowError, ValueError):
        return f"errno {err}"


class ErrorReply(DeviceError):
    """The device answered ``cmd`` with a vfio-user error reply."""

    def __init__(self, cmd: int, name: str, err: int, what: str = ""):
        text = _strerror(err) if err else "error"
        super().__init__(err, f"{name}: {text}{': ' + what if what else ''}")
        self.cmd = cmd


class Disconnected(DeviceError, ConnectionError):
    """The vfio-user connection closed."""

    def __init__(self, msg: str = "vfio-user connection closed"):
        super().__init__(errnos.ECONNRESET, msg)


class StreamError(DeviceError):
    """Migration data a device must not load (seed 003: a corrupted
    migration may fail, but must not corrupt)."""

    def __init__(self, msg: str):
        super().__init__(errnos.EINVAL, msg)


class QemuError(QmpmigError):
    """Something about a QEMU."""


class QemuGone(QemuError):
    """The QMP connection ended: QEMU exited, was killed, or hung up."""


class QemuCommandError(QemuError):
    """QEMU refused a command; ``error_class`` is QMP's class (GenericError, ...)."""

    def __init__(self, command: str, error_class: str, desc: str):
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class VmError(QemuError):
    """A QEMU process the rig started failed to start, boot or stop."""


class MigrationFailed(QmpmigError):
    """The migration did not complete; the message says what happened."""


class QemuMigrationFailed(MigrationFailed):
    """QEMU reported its migration failed (often: the other end went away)."""


class Desync(MigrationFailed):
    """A device is not in the state the controller left it in."""


class EarlySwitchover(MigrationFailed):
    """QEMU stopped the vCPUs and switched over before the grace state."""
