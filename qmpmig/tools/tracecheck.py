"""The trace checker: proves the ordering rules of the source documents over
a controller trace (``schemas/trace.schema.json``, one record per line).

It states every rule itself, from the documents, and shares no rule code
with the controller (nothing from ``qmpmig.migration`` or
``qmpmig.controller``), so a bug in the controller's rules cannot also hide
in its checker.  A record that breaks the schema is reported as such and
not looked at further.  States are handled by their trace names ("STOP",
"PRE_COPY_P2P", ...).  Each rule is a row of :data:`RULES` and a few lines
of :class:`_Checker`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jsonschema

from ..resources import load_json

#: rule id -> (what it proves, where the rule comes from)
RULES = {
    "schema": ("every record matches schemas/trace.schema.json", "qmpmig"),
    "fsm": ("every device_state change is one arc the FSM allows for the device's flags, "
            "from the state the device was in", "vfio_main.c arc lists above vfio_mig_get_next_state"),
    "vcpu-stop": ("the source vCPUs stop only once every device is in NDMA (a P2P state) with no "
                  "outstanding IO page request", "seed 000: SAVING|NDMA|RUNNING, VCPU_RUNNING grace"),
    "barrier": ("no device goes past a grace state before every device of its side reached it",
                "seed 000: grace states are cross-device synchronisation points"),
    "end-of-stream": ("every source device's data was read to the end of its stream before "
                      "migrate-continue (qmpmig's, or its manager's: seen as the source QEMU going past "
                      "pre-switchover)", "uAPI: STOP_COPY end of stream; seed 002 save_live_complete_precopy"),
    "resume-before-run": ("destination devices run only after every one left RESUMING without error",
                          "seed 000 resume flow; uAPI RESUMING -> STOP validates"),
    "cont-after-copy": ("the destination vCPUs start only after the DMA-dirty pages were copied",
                        "qmpmig: QEMU cannot see device DMA (DESIGN.md)"),
    "ram-verify": ("a destination whose guest RAM was found to differ from the source's is never started",
                   "qmpmig --verify-ram: not a byte of guest RAM lost"),
    "managed": ("a VM whose devices qmpmig owns migrates only in a migration qmpmig drives (one it does not "
                "drive, or cannot follow within the rules, is recorded here and cancelled before its switchover)",
                "qmpmig: a device's state moves only with its migration"),
}

# -- the fsm rule: the kernel's arc lists ------------------------------------

#: VFIO_DEVICE_FEATURE_MIGRATION flags (include/uapi/linux/vfio.h); STOP_COPY
#: is mandatory, bits above these three are ignored.
STOP_COPY, P2P, PRE_COPY = 1, 2, 4
FLAG_MASK = STOP_COPY | P2P | PRE_COPY

# The single arcs a driver performs, as the comment above
# vfio_mig_get_next_state() in drivers/vfio/vfio_main.c lists them.
#: "The coding in this table requires the driver to implement the following FSM arcs".
BASE_ARCS = frozenset({
    ("RESUMING", "STOP"),
    ("STOP", "RESUMING"),
    ("STOP", "STOP_COPY"),
    ("STOP_COPY", "STOP"),
})
#: "Without P2P ... the driver must implement" (with or without PRE_COPY).
NO_P2P_ARCS = frozenset({
    ("RUNNING", "STOP"),
    ("STOP", "RUNNING"),
})
#: "If P2P is supported then the driver must also implement these FSM arcs".
P2P_ARCS = frozenset({
    ("RUNNING", "RUNNING_P2P"),
    ("RUNNING_P2P", "RUNNING"),
    ("RUNNING_P2P", "STOP"),
    ("STOP", "RUNNING_P2P"),
})
#: "If precopy is supported then the driver must support these additional FSM arcs".
PRE_COPY_ARCS = frozenset({
    ("RUNNING", "PRE_COPY"),
    ("PRE_COPY", "RUNNING"),
    ("PRE_COPY", "STOP_COPY"),
})
#: "if precopy and P2P are supported together then the driver must support
#: these additional arcs beyond the P2P arcs above".
PRE_COPY_AND_P2P_ARCS = frozenset({
    ("PRE_COPY", "RUNNING"),
    ("PRE_COPY", "PRE_COPY_P2P"),
    ("PRE_COPY_P2P", "PRE_COPY"),
    ("PRE_COPY_P2P", "RUNNING_P2P"),
    ("PRE_COPY_P2P", "STOP_COPY"),
    ("RUNNING", "PRE_COPY"),
    ("RUNNING_P2P", "PRE_COPY_P2P"),
})

#: flags & FLAG_MASK -> every arc such a device is asked to perform.  A flag
#: set without STOP_COPY is no migration-capable device: it has no arcs.
ARCS: dict[int, frozenset[tuple[str, str]]] = {
    STOP_COPY: BASE_ARCS | NO_P2P_ARCS,
    STOP_COPY | P2P: BASE_ARCS | P2P_ARCS,
    STOP_COPY | PRE_COPY: BASE_ARCS | NO_P2P_ARCS | PRE_COPY_ARCS,
    STOP_COPY | P2P | PRE_COPY: BASE_ARCS | P2P_ARCS | PRE_COPY_AND_P2P_ARCS,
}


def arcs(flags: int) -> frozenset[tuple[str, str]]:
    """The arcs of a device with these migration flags (vfio_main.c lists)."""
    return ARCS.get(flags & FLAG_MASK, frozenset())


# -- the grace states --------------------------------------------------------

#: The grace states (seed 000, the NDMA proposal's reference flows): on the
#: source NDMA|RUNNING and SAVING|NDMA|RUNNING, whose v2 twins are
#: RUNNING_P2P and PRE_COPY_P2P; on the destination NDMA|RUNNING, i.e.
#: RUNNING_P2P on the way from STOP to RUNNING.
GRACE = {"src": frozenset({"PRE_COPY_P2P", "RUNNING_P2P"}), "dst": frozenset({"RUNNING_P2P"})}

#: Past the grace state (seed 000): on the source every state whose device
#: no longer runs (v1 RUNNING clear: 0, SAVING, RESUMING, SAVING|RESUMING);
#: on the destination the normal operating state RUNNING.
PAST_GRACE = {"src": frozenset({"STOP", "STOP_COPY", "RESUMING", "ERROR"}), "dst": frozenset({"RUNNING"})}

#: The NDMA states (seed 000: NDMA|RUNNING, SAVING|NDMA|RUNNING) in which the
#: source vCPUs may stop.
NDMA_STATES = frozenset({"PRE_COPY_P2P", "RUNNING_P2P"})


def past_grace(side: str, state: str | None) -> bool:
    """Whether ``state`` is past the grace state of ``side`` (seed 000)."""
    return state in PAST_GRACE["src" if side == "src" else "dst"]


# -- the checker --------------------------------------------------------------


def load(path: str | Path) -> list[dict]:
    """A JSON-lines trace file, one record per non-blank line."""
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
    """Replays a trace once, record by record, keeping each device's state."""

    def __init__(self, records: list[dict]):
        self.records = records
        self.out: list[Violation] = []
        self.devices: dict[tuple[str, str], dict] = {}
        self.state: dict[tuple[str, str], str] = {}
        self.outstanding: dict[tuple[str, str], int] = {}
        self.handlers: dict[str, Callable[[dict], None]] = {
            "start": self.on_start,
            "paired": self.on_start,
            "phase": self.on_phase,
            "page_request": self.on_page_request,
            "page_complete": self.on_page_complete,
            "qmp_command": self.on_qmp_command,
            "libvirt_call": self.on_libvirt_call,
            "vm_state": self.on_vm_state,
            "violation": self.on_violation,
            "desync": self.on_desync,
            "qmp_event": self.on_qmp_event,
            "end_of_stream": self.on_end_of_stream,
            "data": self.on_data,
            "dirty_copy": self.on_dirty_copy,
            "ram_verify": self.on_ram_verify,
            "device_error": self.on_device_error,
            "device_state": self.on_device_state,
        }
        self._new_attempt()

    def _new_attempt(self) -> None:
        self.we_stopped = self.qemu_stopped = False
        self.eos: set[str] = set()
        self.resumed: set[str] = set()
        self.dst_error = False
        self.copied = False
        self.ram_differs = False
        self.continued = False

    def fail(self, rule: str, rec: dict, message: str) -> None:
        self.out.append(Violation(rule, rec.get("seq", -1), message))

    def side_devices(self, side: str, need: int = 0) -> list[str]:
        return [n for (s, n), d in self.devices.items() if s == side and d["flags"] & need == need]

    def run(self) -> list[Violation]:
        validator = jsonschema.Draft202012Validator(load_json("trace.schema.json"))
        for rec in self.records:
            errors = [err.message for err in validator.iter_errors(rec)]
            for message in errors:
                self.fail("schema", rec, message)
            handler = self.handlers.get(str(rec.get("kind")))
            if handler and not errors:
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
        """vcpu-stop at ``stop``; end-of-stream at ``migrate-continue`` (uAPI
        end of stream, seed 002 save_live_complete_precopy); cont-after-copy
        resume-before-run and ram-verify at the destination's ``cont``."""
        side, command = rec["side"], rec.get("command")
        if side == "src" and command == "stop":
            self.we_stopped = True
            for problem in self._not_quiesced():
                self.fail("vcpu-stop", rec, f"vCPUs stopped while {problem}")
        elif side == "src" and command == "migrate-continue":
            self._continued(rec, "migrate-continue")
        elif side == "dst" and command == "cont":
            if not self.copied:
                self.fail("cont-after-copy", rec, "destination cont before the DMA-dirty copy")
            if self.ram_differs:
                self.fail("ram-verify", rec, "destination cont although its guest RAM differs from the source's")
            for name in self.side_devices("dst"):
                if self.state.get(("dst", name)) != "RUNNING":
                    self.fail("resume-before-run", rec, f"destination cont while {name} is in "
                                                        f"{self._name('dst', name)}")

    def on_libvirt_call(self, rec: dict) -> None:
        """A libvirt call is held to the rule of the QMP command libvirt
        sends for it (virDomainSuspend: stop, virDomainResume: cont)."""
        self.on_qmp_command({**rec, "command": rec["qmp"]})

    def on_vm_state(self, rec: dict) -> None:
        """end-of-stream: a source QEMU that completed was continued past
        pre-switchover, by qmpmig or by whoever answered it (libvirt answers
        at once).  Not ``device``: QEMU 7.2's migrate_cancel wakes a paused
        migration before it marks it cancelling, and it may pass through
        ``device`` on its way to ``cancelled``."""
        if rec["side"] == "src" and rec["status"] == "completed":
            self._continued(rec, "the source QEMU completed")

    def on_desync(self, rec: dict) -> None:
        """The controller found a device elsewhere than it left it (someone
        else reset or moved it): its arcs go on from there."""
        self.state[rec["side"], rec["device"]] = rec["actual"]

    def on_violation(self, rec: dict) -> None:
        """What the controller itself saw could not be kept, under its rule."""
        self.fail(rec["rule"] if rec["rule"] in RULES else "managed", rec, rec["message"])

    def _continued(self, rec: dict, what: str) -> None:
        if self.continued:
            return
        self.continued = True
        for name in self.side_devices("src"):
            if name not in self.eos or self.state.get(("src", name)) != "STOP_COPY":
                self.fail("end-of-stream", rec, f"{what} before {name}'s stream ended")

    def _not_quiesced(self) -> list[str]:
        """Why the source vCPUs may not stop now (seed 000 grace: every P2P
        device in NDMA, every IO page fault completed)."""
        problems = [f"{name} is in {self._name('src', name)}, not NDMA"
                    for name in self.side_devices("src", P2P)
                    if self.state.get(("src", name)) not in NDMA_STATES]
        for name in self.side_devices("src"):
            if self.outstanding.get(("src", name)):
                problems.append(f"{name} has {self.outstanding['src', name]} page request(s) outstanding")
        return problems

    def on_qmp_event(self, rec: dict) -> None:
        """QEMU may stop the vCPUs by itself; after the grace state (seed 000)
        that is the vCPU stop of the reference flow, before it the attempt
        must not go on to STOP_COPY."""
        if rec["side"] == "src" and rec.get("event") == "STOP" and not self.we_stopped:
            self.qemu_stopped = bool(self._not_quiesced())
            self.we_stopped = not self.qemu_stopped

    def on_end_of_stream(self, rec: dict) -> None:
        """The uAPI's end of stream is only reached in STOP_COPY."""
        if self.state.get(("src", rec["device"])) == "STOP_COPY":
            self.eos.add(rec["device"])
        else:
            self.fail("end-of-stream", rec, f"{rec['device']}: end of stream claimed in "
                                            f"{self._name('src', rec['device'])}, not STOP_COPY")

    def on_data(self, rec: dict) -> None:
        self.eos.discard(rec["device"])

    def on_dirty_copy(self, rec: dict) -> None:
        self.copied = True

    def on_ram_verify(self, rec: dict) -> None:
        self.ram_differs = rec["differing"] > 0

    def on_device_error(self, rec: dict) -> None:
        if rec["side"] == "dst":
            self.dst_error = True
        self.state.pop((rec["side"], rec["device"]), None)

    def on_device_state(self, rec: dict) -> None:
        """fsm: a reset ends in RUNNING; any other change is one arc of the
        vfio_main.c lists for the device's flags, from its known state."""
        name, side = rec["device"], rec["side"]
        old, new = rec["from"], rec["to"]
        flags = self.devices.get((side, name), {}).get("flags", 7)
        if rec.get("via") == "reset":
            if new != "RUNNING":
                self.fail("fsm", rec, f"{name}: a reset ends in RUNNING, not {new}")
        else:
            known = self.state.get((side, name))
            if known is not None and known != old:
                self.fail("fsm", rec, f"{name}: arc from {old}, but the device was in {known}")
            if (old, new) not in arcs(flags):
                self.fail("fsm", rec, f"{name}: {old} -> {new} is not an arc for flags {flags:#x}")
            self._ordering(rec, name, side, old, new)
        self.state[side, name] = new
        if new == "STOP_COPY":
            self.eos.discard(name)
        if side == "dst" and (old, new) == ("RESUMING", "STOP"):
            self.resumed.add(name)

    def _name(self, side: str, device: str) -> str:
        return self.state.get((side, device)) or "an unknown state"

    def _ordering(self, rec: dict, name: str, side: str, old: str, new: str) -> None:
        """barrier (seed 000: the grace states synchronise the devices of a
        side), vcpu-stop after QEMU's own early stop, and resume-before-run
        (seed 000 resume flow: RESUMING -> STOP on every device first)."""
        if old in GRACE[side] and past_grace(side, new):
            behind = [p for p in self.side_devices(side, P2P) if p != name
                      and not (self.state.get((side, p)) in GRACE[side] or past_grace(side, self.state.get((side, p))))]
            if behind:
                self.fail("barrier", rec, f"{name} left {old} for {new} while "
                                          + ", ".join(f"{p} was in {self._name(side, p)}" for p in behind))
        if side == "src" and new == "STOP_COPY" and self.qemu_stopped:
            self.fail("vcpu-stop", rec, f"{name} to STOP_COPY after QEMU stopped the vCPUs before the grace state")
        if side == "dst" and old == "STOP" and new in ("RUNNING_P2P", "RUNNING"):
            waiting = [p for p in self.side_devices("dst") if p not in self.resumed]
            if waiting or self.dst_error:
                why = f"{', '.join(waiting)} did not leave RESUMING cleanly" if waiting else "a device failed"
                self.fail("resume-before-run", rec, f"{name} to {new} while {why}")
