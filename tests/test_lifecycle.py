"""The lifecycle table: complete over QEMU's enums, schema-valid, and
consistent with the FSM along the paths QEMU really takes."""

import copy

import jsonschema
import pytest

from qmpmig.migration import lifecycle
from qmpmig.resources import load_json
from qmpmig.migration.fsm import plan, supports
from qmpmig.errors import LifecycleRefused
from qmpmig.migration.lifecycle import target
from qmpmig.migration.states import DEFINED_FLAG_SETS, MigFlags, MigState

S = MigState
ALL = MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY
V1_LIKE = MigFlags.STOP_COPY | MigFlags.PRE_COPY  # a v1 device: SAVING|RUNNING is its pre-copy


def test_table_is_valid_and_complete():
    lifecycle.table.cache_clear()
    data = lifecycle.table()
    assert set(data["runstates"]) == set(lifecycle.RUNSTATES)
    assert set(data["statuses"]) == set(lifecycle.STATUSES)


def test_completeness_check_catches_a_missing_rule():
    broken = copy.deepcopy(lifecycle.table())
    del broken["roles"]["source"]["statuses"]["device"]["stopped"]
    with pytest.raises(ValueError, match="device"):
        lifecycle._check_complete(broken)
    broken = copy.deepcopy(lifecycle.table())
    del broken["statuses"]["wait-unplug"]
    with pytest.raises(ValueError, match="wait-unplug"):
        lifecycle._check_complete(broken)


def test_schema_rejects_error_as_a_target():
    data = copy.deepcopy(lifecycle.table())
    data["roles"]["source"]["statuses"]["none"]["running"] = "ERROR"
    schema = load_json("lifecycle.schema.json")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)


@pytest.mark.parametrize("flags", DEFINED_FLAG_SETS, ids=lambda f: f"flags{int(f)}")
def test_every_tuple_is_a_supported_state_or_a_reasoned_refusal(flags):
    answered = 0
    for role in lifecycle.ROLES:
        for runstate in lifecycle.RUNSTATES:
            for status in lifecycle.STATUSES:
                try:
                    state = target(role, runstate, status, flags)
                except LifecycleRefused as err:
                    assert err.reason and isinstance(err, ValueError)
                    continue
                assert state is not S.ERROR and supports(flags, state)
                answered += 1
    assert answered > 200


@pytest.mark.parametrize("role,runstate,status,flags,expected", [
    # Seed 002's save path, v1 bits in the comments.
    ("source", "running", "none", ALL, S.RUNNING),                 # _RUNNING
    ("source", "running", "setup", V1_LIKE, S.PRE_COPY),           # _RUNNING|_SAVING
    ("source", "running", "active", V1_LIKE, S.PRE_COPY),          # _RUNNING|_SAVING
    ("source", "finish-migrate", "device", V1_LIKE, S.STOP_COPY),  # _SAVING
    ("source", "postmigrate", "completed", V1_LIKE, S.STOP),       # _STOPPED
    # Seed 002's resume path.
    ("destination", "inmigrate", "active", ALL, S.RESUMING),
    ("destination", "running", "completed", ALL, S.RUNNING),
    ("destination", "paused", "completed", ALL, S.STOP),           # -S: runs only at cont
    # A device without pre-copy stays RUNNING through RAM pre-copy.
    ("source", "running", "active", MigFlags.STOP_COPY, S.RUNNING),
    ("source", "finish-migrate", "pre-switchover", MigFlags.STOP_COPY, S.STOP_COPY),
    # Failure returns the source device to the vCPUs' state.
    ("source", "running", "cancelled", ALL, S.RUNNING),
    ("source", "running", "failed", ALL, S.RUNNING),
    ("source", "paused", "failed", ALL, S.STOP),
])
def test_seed_tuples(role, runstate, status, flags, expected):
    assert target(role, runstate, status, flags) is expected


@pytest.mark.parametrize("role", lifecycle.ROLES)
@pytest.mark.parametrize("status", ["postcopy-active", "postcopy-paused", "postcopy-recover",
                                    "postcopy-recover-setup", "postcopy-device", "colo"])
def test_postcopy_and_colo_are_refused(role, status):
    with pytest.raises(LifecycleRefused, match="postcopy|COLO"):
        target(role, "running", status, ALL)


@pytest.mark.parametrize("runstate,status", [("inmigrate", "active"), ("colo", "none"),
                                             ("running", "pre-switchover"), ("banana", "none"),
                                             ("running", "banana")])
def test_source_refusals(runstate, status):
    with pytest.raises(LifecycleRefused):
        target("source", runstate, status, ALL)


def test_unknown_role_is_a_value_error():
    with pytest.raises(ValueError):
        target("sideways", "running", "none", ALL)


SAVE = [("running", "none"), ("running", "setup"), ("running", "active"), ("paused", "active"),
        ("finish-migrate", "active"), ("finish-migrate", "pre-switchover"),
        ("finish-migrate", "device"), ("finish-migrate", "completed"), ("postmigrate", "completed")]
RESUME = [("inmigrate", "none"), ("inmigrate", "setup"), ("inmigrate", "active"),
          ("paused", "completed"), ("running", "completed")]
CANCEL = [("running", "active"), ("running", "cancelling"), ("running", "cancelled")]
CANCEL_AT_SWITCHOVER = [("running", "active"), ("finish-migrate", "pre-switchover"),
                        ("finish-migrate", "cancelling"), ("running", "cancelled")]
PAUSED_SAVE = [("paused", "none"), ("paused", "setup"), ("paused", "active"),
               ("finish-migrate", "device"), ("postmigrate", "completed")]


@pytest.mark.parametrize("flags", DEFINED_FLAG_SETS, ids=lambda f: f"flags{int(f)}")
@pytest.mark.parametrize("role,path", [("source", SAVE), ("destination", RESUME),
                                       ("source", CANCEL), ("source", CANCEL_AT_SWITCHOVER),
                                       ("source", PAUSED_SAVE)],
                         ids=["save", "resume", "cancel", "cancel-at-switchover", "paused-save"])
def test_qemu_paths_are_legal_device_paths(role, path, flags):
    """Driving the device from target to target along a QEMU path never asks
    the FSM for a refused arc."""
    states = [target(role, r, s, flags) for r, s in path]
    for a, b in zip(states, states[1:]):
        plan(a, b, flags)
