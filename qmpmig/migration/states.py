"""Device migration states, in the numbers of the Linux VFIO uAPI.

v2 (include/uapi/linux/vfio.h, enum vfio_device_mig_state and
VFIO_MIGRATION_*) is a state machine; v1 (the migration region's
device_state, kernels 5.8-5.17) is a set of control bits, to which seed 000
adds NDMA.  This module holds the numbers and the v1 <-> v2 equivalence;
the transition rules live in :mod:`qmpmig.migration.fsm`.
"""

from __future__ import annotations

import enum


class MigState(enum.IntEnum):
    """v2 device_state (uAPI ``enum vfio_device_mig_state``)."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class MigFlags(enum.IntFlag):
    """Flags of VFIO_DEVICE_FEATURE_MIGRATION; STOP_COPY is mandatory."""

    STOP_COPY = 1
    P2P = 2
    PRE_COPY = 4


#: The flag sets the uAPI defines (vfio.h above enum vfio_device_mig_state).
DEFINED_FLAG_SETS = (
    MigFlags.STOP_COPY,
    MigFlags.STOP_COPY | MigFlags.P2P,
    MigFlags.STOP_COPY | MigFlags.PRE_COPY,
    MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY,
)


class V1(enum.IntFlag):
    """v1 device_state bits; NDMA is seed 000's proposal (upstream: reserved)."""

    RUNNING = 1
    SAVING = 2
    RESUMING = 4
    NDMA = 8


#: The three bits the v1 header's VALID and ERROR macros look at.
V1_MASK = V1.RUNNING | V1.SAVING | V1.RESUMING
#: SAVING|RESUMING: set by the driver on an internal error, never requested.
V1_ERROR = V1.SAVING | V1.RESUMING


def v1_valid(bits: int) -> bool:
    """VFIO_DEVICE_STATE_VALID: RESUMING clear, or the only one of the three set."""
    return not bits & V1.RESUMING or bits & V1_MASK == V1.RESUMING


def v1_is_error(bits: int) -> bool:
    """VFIO_DEVICE_STATE_IS_ERROR: exactly SAVING|RESUMING of the three."""
    return bits & V1_MASK == V1_ERROR


#: v1 bit group -> its v2 twin.  NDMA|RUNNING and SAVING|NDMA|RUNNING are
#: the seed-000 grace states; the P2P states are their v2 successors (NDMA
#: stops all DMA, the P2P states only P2P DMA).
V1_TO_V2 = {
    V1(0): MigState.STOP,
    V1.RUNNING: MigState.RUNNING,
    V1.SAVING: MigState.STOP_COPY,
    V1.SAVING | V1.RUNNING: MigState.PRE_COPY,
    V1.RESUMING: MigState.RESUMING,
    V1.NDMA | V1.RUNNING: MigState.RUNNING_P2P,
    V1.SAVING | V1.NDMA | V1.RUNNING: MigState.PRE_COPY_P2P,
    V1_ERROR: MigState.ERROR,
}
V2_TO_V1 = {state: bits for bits, state in V1_TO_V2.items()}


def v1_normalize(bits: int) -> V1:
    """Drop NDMA where it says nothing: !RUNNING implies NDMA (seed 000)."""
    if not bits & V1.RUNNING:
        bits &= ~int(V1.NDMA)
    return V1(bits)


def v1_to_v2(bits: int) -> MigState:
    """The v2 state a v1 device_state value means; ValueError if none."""
    try:
        return V1_TO_V2[v1_normalize(bits)]
    except KeyError:
        raise ValueError(f"v1 device_state {bits:#x} has no v2 equivalent") from None


def v2_to_v1(state: MigState) -> V1:
    """The canonical v1 bits for a v2 state."""
    return V2_TO_V1[MigState(state)]
