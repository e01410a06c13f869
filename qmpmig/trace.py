"""The controller's JSON-lines trace, and the checker of its ordering rules.

Every QMP command and event, every (run state, migration status), every
device_state arc, page request, barrier and data movement becomes one
record (``schemas/trace.schema.json``).  :func:`check` replays a trace and
proves the orderings seed 000 and the uAPI demand; each rule is a row of
:data:`RULES` and a few lines of :class:`_Checker`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import jsonschema

from . import fsm
from .states import V1, MigFlags, MigState, v2_to_v1

SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "trace.schema.json"

#: rule id -> (what it proves, where the rule comes from)
RULES = {
    "schema": ("every record matches schemas/trace.schema.json", "qmpmig"),
    "fsm": ("every device_state change is one arc the FSM allows for the device's flags, "
            "from the state the device was in", "vfio_main.c vfio_mig_get_next_state"),
    "vcpu-stop": ("the source vCPUs stop only once every device is in NDMA (a P2P state) with no "
                  "outstanding IO page request", "seed 000: SAVING|NDMA|RUNNING, VCPU_RUNNING grace"),
    "barrier": ("no device goes past a grace state before every device of its side reached it",
                "seed 000: grace states are cross-device synchronisation points"),
    "end-of-stream": ("every source device's data was read to the end of its stream before "
                      "migrate-continue", "uAPI: STOP_COPY end of stream; seed 002 save_live_complete_precopy"),
    "resume-before-run": ("destination devices run only after every one left RESUMING without error",
                          "seed 000 resume flow; uAPI RESUMING -> STOP validates"),
    "cont-after-copy": ("the destination vCPUs start only after the DMA-dirty pages were copied",
                        "qmpmig: QEMU cannot see device DMA (DESIGN.md)"),
}

GRACE = {"src": {MigState.PRE_COPY_P2P, MigState.RUNNING_P2P}, "dst": {MigState.RUNNING_P2P}}
NDMA_STATES = {MigState.PRE_COPY_P2P, MigState.RUNNING_P2P}


def past_grace(side: str, state: MigState | None) -> bool:
    """Past a grace state: the source stops (!RUNNING), the destination runs."""
    if state is None:
        return False
    return not v2_to_v1(state) & V1.RUNNING if side == "src" else state is MigState.RUNNING


class Trace:
    """Writes records as JSON lines (to ``path``, if given) and keeps them."""

    def __init__(self, path: str | Path | None = None):
        self.records: list[dict] = []
        self._t0 = time.monotonic()
        self._file: IO[str] | None = open(path, "w", buffering=1) if path else None

    def emit(self, kind: str, **fields) -> dict:
        record = {"seq": len(self.records), "t": round(time.monotonic() - self._t0, 6), "kind": kind}
        record.update({k: (v.name if isinstance(v, MigState) else v) for k, v in fields.items()})
        self.records.append(record)
        if self._file:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
        return record

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


def load(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass(frozen=True)
class Violation:
    rule: str
    seq: int
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: record {self.seq}: {self.message}"


def check(records: list[dict]) -> list[Violation]:
    """Every rule of :data:`RULES` over a trace; empty when all hold."""
    return _Checker(records).run()


class _Checker:
    def __init__(self, records: list[dict]):
        self.records = records
        self.out: list[Violation] = []
        self.devices: dict[tuple[str, str], dict] = {}
        self.state: dict[tuple[str, str], MigState] = {}
        self.outstanding: dict[tuple[str, str], int] = {}
        self._new_attempt()

    def _new_attempt(self) -> None:
        self.we_stopped = self.qemu_stopped = False
        self.eos: set[str] = set()
        self.resumed: set[str] = set()
        self.dst_error = False
        self.copied = False

    def fail(self, rule: str, rec: dict, message: str) -> None:
        self.out.append(Violation(rule, rec.get("seq", -1), message))

    def side_devices(self, side: str, need: int = 0) -> list[str]:
        return [n for (s, n), d in self.devices.items() if s == side and d["flags"] & need == need]

    def run(self) -> list[Violation]:
        validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
        for rec in self.records:
            for err in validator.iter_errors(rec):
                self.fail("schema", rec, err.message)
            handler = getattr(self, "on_" + str(rec.get("kind")), None)
            if handler:
                handler(rec)
        return self.out

    def on_start(self, rec: dict) -> None:
        for dev in rec["devices"]:
            self.devices[dev["side"], dev["name"]] = dev
            self.outstanding[dev["side"], dev["name"]] = 0

    def on_phase(self, rec: dict) -> None:
        if rec["name"] == "attempt":
            self._new_attempt()

    def on_page_request(self, rec: dict) -> None:
        key = rec["side"], rec["device"]
        self.outstanding[key] = self.outstanding.get(key, 0) + 1

    def on_page_complete(self, rec: dict) -> None:
        key = rec["side"], rec["device"]
        self.outstanding[key] = self.outstanding.get(key, 0) - 1

    def on_qmp_command(self, rec: dict) -> None:
        side, command = rec["side"], rec.get("command")
        if side == "src" and command == "stop":
            self.we_stopped = True
            for problem in self._not_quiesced():
                self.fail("vcpu-stop", rec, f"vCPUs stopped while {problem}")
        elif side == "src" and command == "migrate-continue":
            for name in self.side_devices("src"):
                if name not in self.eos or self.state.get(("src", name)) is not MigState.STOP_COPY:
                    self.fail("end-of-stream", rec, f"migrate-continue before {name}'s stream ended")
        elif side == "dst" and command == "cont":
            if not self.copied:
                self.fail("cont-after-copy", rec, "destination cont before the DMA-dirty copy")
            for name in self.side_devices("dst"):
                if self.state.get(("dst", name)) is not MigState.RUNNING:
                    self.fail("resume-before-run", rec, f"destination cont while {name} is in "
                                                        f"{self._name('dst', name)}")

    def _not_quiesced(self) -> list[str]:
        """Why the source vCPUs may not stop now (seed 000 grace)."""
        problems = [f"{name} is in {self._name('src', name)}, not NDMA"
                    for name in self.side_devices("src", MigFlags.P2P)
                    if self.state.get(("src", name)) not in NDMA_STATES]
        for name in self.side_devices("src"):
            if self.outstanding.get(("src", name)):
                problems.append(f"{name} has {self.outstanding['src', name]} page request(s) outstanding")
        return problems

    def on_qmp_event(self, rec: dict) -> None:
        """QEMU may stop the vCPUs by itself; after the grace state that is
        the vCPU stop of the reference flow, before it the attempt must not
        go on to STOP_COPY."""
        if rec["side"] == "src" and rec.get("event") == "STOP" and not self.we_stopped:
            self.qemu_stopped = bool(self._not_quiesced())
            self.we_stopped = not self.qemu_stopped

    def on_end_of_stream(self, rec: dict) -> None:
        if self.state.get(("src", rec["device"])) is MigState.STOP_COPY:
            self.eos.add(rec["device"])
        else:
            self.fail("end-of-stream", rec, f"{rec['device']}: end of stream claimed in "
                                            f"{self._name('src', rec['device'])}, not STOP_COPY")

    def on_data(self, rec: dict) -> None:
        self.eos.discard(rec["device"])

    def on_dirty_copy(self, rec: dict) -> None:
        self.copied = True

    def on_device_error(self, rec: dict) -> None:
        if rec["side"] == "dst":
            self.dst_error = True
        self.state.pop((rec["side"], rec["device"]), None)

    def on_device_state(self, rec: dict) -> None:
        name, side = rec["device"], rec["side"]
        old, new = MigState[rec["from"]], MigState[rec["to"]]
        flags = self.devices.get((side, name), {}).get("flags", 7)
        if rec.get("via") == "reset":
            if new is not MigState.RUNNING:
                self.fail("fsm", rec, f"{name}: a reset ends in RUNNING, not {new.name}")
        else:
            known = self.state.get((side, name))
            if known is not None and known is not old:
                self.fail("fsm", rec, f"{name}: arc from {old.name}, but the device was in {known.name}")
            if (old, new) not in fsm.arcs(flags):
                self.fail("fsm", rec, f"{name}: {old.name} -> {new.name} is not an arc for flags {flags:#x}")
            self._ordering(rec, name, side, old, new)
        self.state[side, name] = new
        if new is MigState.STOP_COPY:
            self.eos.discard(name)
        if side == "dst" and (old, new) == (MigState.RESUMING, MigState.STOP):
            self.resumed.add(name)

    def _name(self, side: str, device: str) -> str:
        state = self.state.get((side, device))
        return state.name if state else "an unknown state"

    def _ordering(self, rec: dict, name: str, side: str, old: MigState, new: MigState) -> None:
        if old in GRACE[side] and past_grace(side, new):
            behind = [p for p in self.side_devices(side, MigFlags.P2P) if p != name
                      and not (self.state.get((side, p)) in GRACE[side] or past_grace(side, self.state.get((side, p))))]
            if behind:
                self.fail("barrier", rec, f"{name} left {old.name} for {new.name} while "
                                          + ", ".join(f"{p} was in {self._name(side, p)}" for p in behind))
        if side == "src" and new is MigState.STOP_COPY and self.qemu_stopped:
            self.fail("vcpu-stop", rec, f"{name} to STOP_COPY after QEMU stopped the vCPUs before the grace state")
        if side == "dst" and old is MigState.STOP and new in (MigState.RUNNING_P2P, MigState.RUNNING):
            waiting = [p for p in self.side_devices("dst") if p not in self.resumed]
            if waiting or self.dst_error:
                why = f"{', '.join(waiting)} did not leave RESUMING cleanly" if waiting else "a device failed"
                self.fail("resume-before-run", rec, f"{name} to {new.name} while {why}")
