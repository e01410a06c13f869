"""qmpmig's exceptions.

::

    QmpmigError
     +-- QemuGone          QEMU's monitor closed: the process died or quit
     +-- QemuCommandError  QEMU answered a QMP command with an error
     +-- VmError           a QEMU process the harness started misbehaved

Table refusals are ValueErrors of their own modules:
:class:`qmpmig.fsm.InvalidTransition`, :class:`qmpmig.lifecycle.LifecycleRefused`.
"""


class QmpmigError(Exception):
    """Root of qmpmig's runtime errors."""


class QemuGone(QmpmigError):
    """The QMP connection ended: QEMU exited, was killed, or hung up."""


class QemuCommandError(QmpmigError):
    """QEMU refused a command; ``error_class`` is QMP's class (GenericError, ...)."""

    def __init__(self, command: str, error_class: str, desc: str):
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class VmError(QmpmigError):
    """A harness-started QEMU failed to start, boot or stop."""
