"""The daemon's journal: what it owns and how far each migration got,
written ahead and fsync'd, one JSON line per step, so that a daemon that
died and is started again ends every half-done migration safely.

Records (``op``)::

    attach    vm, qmp, ram, devices, protocol, start_ring   a VM handed over
    release   vm                                            ... let go of
    migrate   id, src, dst, uri, trace, running             a migration begins
    settings  id, settings                                  QEMU settings before the flow changed them
    incoming  id                                            the destination is asked to listen
    phase     id, name                                      the flow enters a phase
    loaded    id                                            every destination device left RESUMING cleanly
    end       id, ok, message                               the migration ended

:func:`pending` reads a journal back: the VMs still owned and the
migrations with no end.  The rule for those (:func:`winner`): the
destination only once every device there has loaded its state (``loaded``
comes after QEMU's own ``completed`` on both sides); the source otherwise.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


class Journal:
    """Append-only, each record on disk before the step it announces."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "a", buffering=1)

    def write(self, op: str, **fields) -> None:
        self._file.write(json.dumps({"t": round(time.time(), 3), "op": op, **fields}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def rewrite(self, records: list[dict]) -> None:
        """Replace the journal by ``records`` (what is still live), atomically."""
        staging = self.path.with_suffix(".new")
        with open(staging, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._file.close()
        os.replace(staging, self.path)
        self._file = open(self.path, "a", buffering=1)


@dataclass
class Unfinished:
    """A migration the journal saw begin and not end."""

    begin: dict
    settings: dict = field(default_factory=dict)
    phase: str = "setup"
    #: The destination was asked to listen: it may hold a copy of the guest.
    incoming: bool = False
    loaded: bool = False

    @property
    def id(self) -> str:
        return self.begin["id"]

    def records(self) -> list[dict]:
        """The journal records that say as much again."""
        out = [self.begin]
        if self.settings:
            out.append({"op": "settings", "id": self.id, "settings": self.settings})
        out.append({"op": "phase", "id": self.id, "name": self.phase})
        if self.incoming:
            out.append({"op": "incoming", "id": self.id})
        if self.loaded:
            out.append({"op": "loaded", "id": self.id})
        return out


def read(path: Path) -> list[dict]:
    """The journal's records; a torn last line (the daemon died writing it)
    is dropped."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def pending(records: list[dict]) -> tuple[dict[str, dict], list[Unfinished]]:
    """(VM name -> its attach record, the unfinished migrations)."""
    vms: dict[str, dict] = {}
    migrations: dict[str, Unfinished] = {}
    for record in records:
        op, key = record.get("op"), record.get("vm", record.get("id"))
        if op == "attach" and {"vm", "qmp", "ram", "devices"} <= record.keys():
            vms[key] = record
        elif op == "release":
            vms.pop(key, None)
        elif op == "migrate" and {"id", "src", "dst"} <= record.keys():
            migrations[key] = Unfinished(record)
        elif op == "end":
            migrations.pop(key, None)
        elif key in migrations:
            m = migrations[key]
            if op == "settings":
                m.settings = record.get("settings") or {}
            elif op == "phase":
                m.phase = record.get("name", m.phase)
            elif op == "incoming":
                m.incoming = True
            elif op == "loaded":
                m.loaded = True
    return vms, list(migrations.values())


def winner(m: Unfinished) -> str:
    """Where the guest must run: ``dst`` once every destination device had
    loaded its state, else ``src``."""
    return "dst" if m.loaded else "src"
