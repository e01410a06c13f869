"""v1 bits, their validity, their v2 twins, and seed 000's action order."""

import pytest

from qmpmig.errors import InvalidTransition
from qmpmig.migration.fsm import V1_ACTIONS, v1_actions, v1_requestable
from qmpmig.migration.states import (V1, MigFlags, MigState, v1_is_error, v1_to_v2, v1_valid,
                           v2_to_v1)

R, S, RES, N = V1.RUNNING, V1.SAVING, V1.RESUMING, V1.NDMA


def test_uapi_numbers():
    assert [int(s) for s in MigState] == list(range(8))
    assert [s.name for s in MigState] == ["ERROR", "STOP", "RUNNING", "STOP_COPY", "RESUMING",
                                          "RUNNING_P2P", "PRE_COPY", "PRE_COPY_P2P"]
    assert (MigFlags.STOP_COPY, MigFlags.P2P, MigFlags.PRE_COPY) == (1, 2, 4)
    assert (R, S, RES, N) == (1, 2, 4, 8)


def test_v1_valid_and_error_as_the_header_macros():
    # RESUMING|SAVING|RUNNING values 0..7: 5, 6, 7 invalid; 6 is also the error value.
    assert [v1_valid(v) for v in range(8)] == [True, True, True, True, True, False, False, False]
    assert [v for v in range(8) if v1_is_error(v)] == [6]
    # Both macros ignore bits 3-31, NDMA included.
    assert all(v1_valid(v | N) == v1_valid(v) and v1_is_error(v | N) == v1_is_error(v) for v in range(8))


def test_v1_v2_equivalence():
    assert v1_to_v2(S | R) is MigState.PRE_COPY
    assert v1_to_v2(N | R) is MigState.RUNNING_P2P
    assert v1_to_v2(S | N | R) is MigState.PRE_COPY_P2P
    assert v1_to_v2(S) is MigState.STOP_COPY
    assert v1_to_v2(0) is MigState.STOP
    assert v1_to_v2(RES) is MigState.RESUMING
    assert v1_to_v2(S | RES) is MigState.ERROR
    for state in MigState:
        assert v1_to_v2(v2_to_v1(state)) is state
    # !RUNNING implies NDMA: the bit adds nothing there.
    assert v1_to_v2(S | N) is MigState.STOP_COPY
    for bad in (RES | R, RES | S | R, 0x10, R | 0x100):
        with pytest.raises(ValueError):
            v1_to_v2(bad)


def test_v1_requestable():
    assert [v for v in range(16) if v1_requestable(v)] == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12]
    assert not v1_requestable(R | 0x10)


def test_action_priority_is_seed_000s():
    assert [a.name for a in V1_ACTIONS] == ["SAVING|RUNNING", "NDMA", "!RUNNING", "SAVING|!RUNNING",
                                            "RESUMING", "!RESUMING", "RUNNING", "!NDMA"]


@pytest.mark.parametrize("old,new,actions", [
    # The seed-000 save flow, step by step.
    (R, S | R, ["SAVING|RUNNING"]),
    (S | R, S | N | R, ["NDMA"]),
    (S | N | R, S, ["!RUNNING", "SAVING|!RUNNING", "!NDMA"]),
    (S, 0, []),
    # The resume flow.
    (R, 0, ["!RUNNING"]),
    (0, RES, ["RESUMING"]),
    (RES, N | R, ["NDMA", "!RESUMING", "RUNNING"]),
    (N | R, R, ["!NDMA"]),
    # One write, many groups: RUNNING to stop-and-copy in one go.
    (R, S, ["!RUNNING", "SAVING|!RUNNING"]),
    (0, S | R, ["SAVING|RUNNING", "RUNNING"]),
    (RES, R, ["!RESUMING", "RUNNING"]),
    (R, R, []),
])
def test_v1_actions(old, new, actions):
    assert v1_actions(old, new) == actions


@pytest.mark.parametrize("new", [S | RES, RES | R, RES | S | R, 0x10])
def test_v1_actions_refuse_invalid_requests(new):
    with pytest.raises(InvalidTransition):
        v1_actions(R, new)


#: Seed 000's "Actions on Set/Clear" written out again, as predicates over
#: the bits, in its priority order: an independent model of V1_ACTIONS.
SEED_000_ACTIONS = [
    ("SAVING|RUNNING", lambda b: b & S and b & R),
    ("NDMA", lambda b: b & N),
    ("!RUNNING", lambda b: not b & R),
    ("SAVING|!RUNNING", lambda b: b & S and not b & R),
    ("RESUMING", lambda b: b & RES),
    ("!RESUMING", lambda b: not b & RES),
    ("RUNNING", lambda b: b & R),
    ("!NDMA", lambda b: not b & N),
]


def test_every_valid_pair_triggers_what_seed_000_says_in_its_order():
    """An action fires when the new value enters its condition and the old
    one was not in it; the actions come in the seed's priority order."""
    for old in range(16):
        for new in filter(v1_requestable, range(16)):
            expected = [name for name, holds in SEED_000_ACTIONS if holds(new) and not holds(old)]
            assert v1_actions(old, new) == expected, (old, new)
