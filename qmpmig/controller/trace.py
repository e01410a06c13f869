"""The controller's JSON-lines trace (``schemas/trace.schema.json``).

Every QMP command and event, every (run state, migration status), every
device_state arc, page request, barrier and data movement becomes one
record, written as it happens.  :mod:`qmpmig.tools.tracecheck` proves the
ordering rules over it, from its own statement of them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ..migration.states import MigState

if TYPE_CHECKING:
    from .side import DeviceEnd


class Trace:
    """Writes records as JSON lines (to ``path``, if given) and, with
    ``keep``, keeps them in :attr:`records` (a VM's trace between
    migrations keeps nothing: it must not grow over the VM's life)."""

    def __init__(self, path: str | Path | None = None, keep: bool = True):
        self.keep = keep
        self.records: list[dict] = []
        self._seq = 0
        self._t0 = time.monotonic()
        self._file: IO[str] | None = open(path, "w", buffering=1) if path else None

    def emit(self, kind: str, **fields) -> dict:
        """One record; device states are written by name."""
        record = {"seq": self._seq, "t": round(time.monotonic() - self._t0, 6), "kind": kind}
        record.update({k: (v.name if isinstance(v, MigState) else v) for k, v in fields.items()})
        self._seq += 1
        if self.keep:
            self.records.append(record)
        if self._file:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
        return record

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


def device_list(ends: Iterable[DeviceEnd], side: str | None = None) -> list[dict]:
    """Devices as the trace's ``start`` and ``paired`` records list them
    (what the trace checker needs of each), on ``side`` or their own."""
    return [{"name": end.name, "side": side or end.side.name, "protocol": end.device.protocol,
             "flags": int(end.device.flags)} for end in ends]
