"""(role, QEMU RunState, MigrationStatus) -> the device_state to drive to.

The mapping is data, ``schemas/lifecycle.json``; this module loads it,
checks it against its JSON Schema and against QEMU's enums, and reads it.
Seed 002 gives the save and resume tuples of QEMU's v1 era; QEMU's
hw/vfio/migration.c (vfio_vmstate_change, save_setup, the migration
notifier) anchors the v2 era.
"""

from __future__ import annotations

import functools
from typing import Literal

import jsonschema

from ..errors import LifecycleRefused
from ..resources import load_json
from .fsm import supports
from .states import MigState

Role = Literal["source", "destination"]
ROLES: tuple[Role, ...] = ("source", "destination")

#: qapi/run-state.json RunState, every value QEMU 7.2 to 11.x reports.
RUNSTATES = (
    "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate",
    "prelaunch", "finish-migrate", "restore-vm", "running", "save-vm",
    "shutdown", "suspended", "watchdog", "guest-panicked", "colo",
)

#: qapi/migration.json MigrationStatus, 7.2 to 11.x (postcopy-recover-setup
#: from 9.1, postcopy-device from 10.2, failing from 11.0).
STATUSES = (
    "none", "setup", "cancelling", "cancelled", "active", "postcopy-active",
    "postcopy-paused", "postcopy-recover-setup", "postcopy-recover",
    "postcopy-device", "completed", "failing", "failed", "colo",
    "pre-switchover", "device", "wait-unplug",
)


def _check_complete(table: dict) -> None:
    """Every RunState and MigrationStatus is in the table, and every role
    answers every (class, status) pair that is not refused wholesale."""
    for name, known, listed in (("runstate", RUNSTATES, table["runstates"]),
                                ("status", STATUSES, table["statuses"])):
        if set(known) != set(listed):
            raise ValueError(f"lifecycle table {name}s differ from QEMU's: {set(known) ^ set(listed)}")
    classes = {r["class"] for r in table["runstates"].values()} - set(table["refuse"]["class"])
    statuses = set(STATUSES) - set(table["refuse"]["status"])
    for role in ROLES:
        rules = table["roles"][role]
        need = classes - set(rules["refuse"])
        if set(rules["statuses"]) != statuses:
            raise ValueError(f"lifecycle {role}: statuses differ: {set(rules['statuses']) ^ statuses}")
        for status, row in rules["statuses"].items():
            if missing := need - set(row):
                raise ValueError(f"lifecycle {role} {status}: no rule for {sorted(missing)}")


@functools.cache
def table() -> dict:
    """The lifecycle table, validated."""
    data = load_json("lifecycle.json")
    jsonschema.validate(data, load_json("lifecycle.schema.json"))
    _check_complete(data)
    return data


def target(role: Role, runstate: str, status: str, flags: int) -> MigState:
    """The device_state a device with these migration flags must be driven
    to while its VM is in (runstate, status), in QEMU's spelling."""
    t = table()

    def refuse(reason: str):
        return LifecycleRefused(role, runstate, status, reason)

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    if runstate not in t["runstates"]:
        raise refuse(f"unknown QEMU runstate {runstate!r}")
    if status not in t["statuses"]:
        raise refuse(f"unknown QEMU migration status {status!r}")
    klass = t["runstates"][runstate]["class"]
    rules = t["roles"][role]
    for refusals, key in ((t["refuse"]["class"], klass), (t["refuse"]["status"], status),
                          (rules["refuse"], klass)):
        if key in refusals:
            raise refuse(refusals[key])
    cell = rules["statuses"][status][klass]
    if isinstance(cell, dict):
        raise refuse(cell["refuse"])
    for name in [cell] if isinstance(cell, str) else cell:
        if supports(flags, MigState[name]):
            return MigState[name]
    raise refuse(f"a device with migration flags {flags:#x} has none of {cell}")
