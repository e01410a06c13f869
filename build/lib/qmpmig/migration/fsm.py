"""Every device_state transition rule, v2 and v1, and nothing else.

v2: the kernel steps a combination transition one arc at a time with
``vfio_mig_get_next_state()`` (drivers/vfio/vfio_main.c): one table giving
the next state on the way from ``cur`` to ``new`` when every optional
feature is present, one table of the flags each state needs, and a loop that
skips the states the device lacks.  :func:`next_state` is that algorithm;
:func:`plan` repeats it to the target.

With every feature (STOP_COPY|P2P|PRE_COPY) these combination transitions
take more than one arc (the kernel's own list)::

    PRE_COPY -> PRE_COPY_P2P -> STOP_COPY
    PRE_COPY -> RUNNING -> RUNNING_P2P
    PRE_COPY -> RUNNING -> RUNNING_P2P -> STOP
    PRE_COPY -> RUNNING -> RUNNING_P2P -> STOP -> RESUMING
    PRE_COPY_P2P -> RUNNING_P2P -> RUNNING
    PRE_COPY_P2P -> RUNNING_P2P -> STOP
    PRE_COPY_P2P -> RUNNING_P2P -> STOP -> RESUMING
    RESUMING -> STOP -> RUNNING_P2P
    RESUMING -> STOP -> RUNNING_P2P -> PRE_COPY_P2P
    RESUMING -> STOP -> RUNNING_P2P -> RUNNING
    RESUMING -> STOP -> RUNNING_P2P -> RUNNING -> PRE_COPY
    RESUMING -> STOP -> STOP_COPY
    RUNNING -> RUNNING_P2P -> PRE_COPY_P2P
    RUNNING -> RUNNING_P2P -> STOP
    RUNNING -> RUNNING_P2P -> STOP -> RESUMING
    RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY
    RUNNING_P2P -> RUNNING -> PRE_COPY
    RUNNING_P2P -> STOP -> RESUMING
    RUNNING_P2P -> STOP -> STOP_COPY
    STOP -> RUNNING_P2P -> PRE_COPY_P2P
    STOP -> RUNNING_P2P -> RUNNING
    STOP -> RUNNING_P2P -> RUNNING -> PRE_COPY
    STOP_COPY -> STOP -> RESUMING
    STOP_COPY -> STOP -> RUNNING_P2P
    STOP_COPY -> STOP -> RUNNING_P2P -> RUNNING

and STOP_COPY -> PRE_COPY, STOP_COPY -> PRE_COPY_P2P are refused.  ERROR is
never a target and never a way through: where the table says ERROR the
kernel answers -EINVAL.  Read literally, the kernel's skip loop never ends
on those two refused requests (ERROR needs ~0 flags, so it is "skipped" to
ERROR again); here the loop stops at ERROR.

v1: one write may change several bit groups; seed 000 fixes the order in
which a driver performs the resulting actions (:data:`V1_ACTIONS`).
"""

from __future__ import annotations

from typing import NamedTuple

from ..errors import InvalidTransition
from .states import MigFlags, MigState, V1, v1_is_error, v1_valid

ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P = MigState


#: vfio_from_fsm_table: NEXT_STEP[cur][new] is the first arc from cur
#: towards new, assuming every optional state exists.  Columns in MigState
#: order: ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY,
#: PRE_COPY_P2P.
NEXT_STEP: dict[MigState, tuple[MigState, ...]] = {
    STOP:         (ERROR, STOP,        RUNNING_P2P, STOP_COPY,    RESUMING, RUNNING_P2P, RUNNING_P2P,  RUNNING_P2P),
    RUNNING:      (ERROR, RUNNING_P2P, RUNNING,     RUNNING_P2P,  RUNNING_P2P, RUNNING_P2P, PRE_COPY,  RUNNING_P2P),
    STOP_COPY:    (ERROR, STOP,        STOP,        STOP_COPY,    STOP,     STOP,        ERROR,        ERROR),
    RESUMING:     (ERROR, STOP,        STOP,        STOP,         RESUMING, STOP,        STOP,         STOP),
    RUNNING_P2P:  (ERROR, STOP,        RUNNING,     STOP,         STOP,     RUNNING_P2P, RUNNING,      PRE_COPY_P2P),
    PRE_COPY:     (ERROR, RUNNING,     RUNNING,     PRE_COPY_P2P, RUNNING,  RUNNING,     PRE_COPY,     PRE_COPY_P2P),
    PRE_COPY_P2P: (ERROR, RUNNING_P2P, RUNNING_P2P, STOP_COPY,    RUNNING_P2P, RUNNING_P2P, PRE_COPY,  PRE_COPY_P2P),
    ERROR:        (ERROR, ERROR,       ERROR,       ERROR,        ERROR,    ERROR,       ERROR,        ERROR),
}

#: state_flags_table: the migration flags a device needs to have the state.
#: ERROR needs every bit, so no device "supports" it as a target.
STATE_FLAGS: dict[MigState, int] = {
    STOP: MigFlags.STOP_COPY,
    RUNNING: MigFlags.STOP_COPY,
    STOP_COPY: MigFlags.STOP_COPY,
    RESUMING: MigFlags.STOP_COPY,
    RUNNING_P2P: MigFlags.STOP_COPY | MigFlags.P2P,
    PRE_COPY: MigFlags.STOP_COPY | MigFlags.PRE_COPY,
    PRE_COPY_P2P: MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY,
    ERROR: 0xFFFFFFFF,
}

ALL_FLAGS = MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY

#: The saving group: one data_fd lives across these states.
SAVING_GROUP = frozenset({PRE_COPY, PRE_COPY_P2P, STOP_COPY})


def supports(flags: int, state: MigState) -> bool:
    """Whether a device with these migration flags has ``state``; flag bits
    the uAPI does not define are ignored, so ERROR is never supported."""
    need = STATE_FLAGS[state]
    return flags & ALL_FLAGS & need == need


def _require(flags: int, *states: MigState) -> None:
    for state in states:
        if not supports(flags, state):
            raise InvalidTransition(f"{state.name} is not a state of a device with flags {flags:#x}")


def next_state(cur: MigState, new: MigState, flags: int) -> MigState:
    """The next arc from ``cur`` towards ``new`` (vfio_mig_get_next_state)."""
    _require(flags, cur, new)
    step = NEXT_STEP[cur][new]
    while step is not ERROR and not supports(flags, step):
        step = NEXT_STEP[step][new]
    if step is ERROR:
        raise InvalidTransition(f"no path from {cur.name} to {new.name}")
    return step


def plan(cur: MigState, new: MigState, flags: int) -> list[MigState]:
    """The states a device steps through from ``cur`` to ``new``, ending with
    ``new``; empty when they are equal.  Raises InvalidTransition where the
    kernel answers -EINVAL."""
    cur, new = MigState(cur), MigState(new)
    _require(flags, cur, new)
    steps: list[MigState] = []
    while cur is not new:
        cur = next_state(cur, new, flags)
        steps.append(cur)
        if len(steps) > len(MigState):
            raise AssertionError(f"plan does not converge: {steps}")
    return steps


def arcs(flags: int) -> frozenset[tuple[MigState, MigState]]:
    """Every single arc a driver with these flags is asked to perform."""
    found = set()
    for cur in MigState:
        for new in MigState:
            try:
                path = plan(cur, new, flags)
            except InvalidTransition:
                continue
            found.update(zip([cur, *path], path))
    return frozenset(found)


# -- v1 ---------------------------------------------------------------------


class V1Action(NamedTuple):
    """An event-triggered action: fires when the requested device_state
    enters the bit group (value under mask) that the current one is not in."""

    name: str
    mask: V1
    value: V1

    def matches(self, bits: int) -> bool:
        return bits & self.mask == self.value


#: Seed 000, "Actions on Set/Clear", in the priority order drivers must keep.
V1_ACTIONS = (
    V1Action("SAVING|RUNNING", V1.SAVING | V1.RUNNING, V1.SAVING | V1.RUNNING),
    V1Action("NDMA", V1.NDMA, V1.NDMA),
    V1Action("!RUNNING", V1.RUNNING, V1(0)),
    V1Action("SAVING|!RUNNING", V1.SAVING | V1.RUNNING, V1.SAVING),
    V1Action("RESUMING", V1.RESUMING, V1.RESUMING),
    V1Action("!RESUMING", V1.RESUMING, V1(0)),
    V1Action("RUNNING", V1.RUNNING, V1.RUNNING),
    V1Action("!NDMA", V1.NDMA, V1(0)),
)


def v1_requestable(bits: int) -> bool:
    """A device_state userspace may write: valid, not the error value, and
    no bit beyond RUNNING|SAVING|RESUMING|NDMA."""
    return v1_valid(bits) and not v1_is_error(bits) and not bits & ~0xF


def v1_actions(old: int, new: int) -> list[str]:
    """The actions a write of ``new`` over ``old`` triggers, in seed 000's order."""
    if not v1_requestable(new):
        raise InvalidTransition(f"v1 device_state {new:#x} may not be requested")
    return [a.name for a in V1_ACTIONS if a.matches(new) and not a.matches(old)]
