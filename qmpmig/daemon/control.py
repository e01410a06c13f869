"""The daemon's control protocol, without I/O: one JSON object per line.

A request is ``{"id": N, "op": NAME, "args": {...}}``; its reply is
``{"id": N, "ok": true, "result": {...}}`` or ``{"id": N, "ok": false,
"error": TEXT}``.  A request may carry bytes (migration data, guest pages
between hosts): its line then says ``"payload": COUNT`` and that many raw
bytes follow it, which the request's handler gets as its ``data``.  A line
longer than :data:`MAX_LINE`, a payload longer than :data:`MAX_PAYLOAD`, or
a line that is not a JSON object is a :class:`ControlError`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import QmpmigError
from ..controller.peerside import PAGES_PER_WRITE
from ..migration.states import MigState

MAX_LINE = 1 << 20
MAX_PAYLOAD = 8 << 20
#: The control socket inside the run directory.
SOCKET = "control.sock"


class ControlError(QmpmigError):
    """The control connection carried something that is not a request or reply."""


def default_run_dir() -> Path:
    """``$QMPMIG_RUN_DIR``; else ``/run/qmpmig`` for root, a per-user one otherwise."""
    if "QMPMIG_RUN_DIR" in os.environ:
        return Path(os.environ["QMPMIG_RUN_DIR"])
    if os.getuid() == 0:
        return Path("/run/qmpmig")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/qmpmig-{os.getuid()}"
    return Path(base) / "qmpmig"


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def request(msg_id: int, op: str, args: dict, payload: bytes | memoryview = b"") -> bytes:
    if not payload:
        return encode({"id": msg_id, "op": op, "args": args})
    return encode({"id": msg_id, "op": op, "args": args, "payload": len(payload)}) + bytes(payload)


def reply(msg_id: int, result: dict | None = None, error: str | None = None) -> bytes:
    if error is not None:
        return encode({"id": msg_id, "ok": False, "error": error})
    return encode({"id": msg_id, "ok": True, "result": result or {}})


def _path(value: object) -> bool:
    return isinstance(value, str) and os.path.isabs(value) and "\0" not in value


def _paths(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(map(_path, value))


def _name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 4096


def _uri(value: object) -> bool:
    """Only the transports a migration needs: ``exec:`` would have QEMU run
    a command line of the requester's choosing."""
    return isinstance(value, str) and value.startswith(("unix:", "tcp:"))


def _libvirt_uri(value: object) -> bool:
    """A libvirt connection URI of the QEMU driver (qemu://, qemu+tcp://, ...)."""
    return isinstance(value, str) and re.fullmatch(r"qemu(\+[a-z]+)?://\S*", value) is not None and len(value) <= 1024


def _seconds(most: float):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= most


def _ring(value: object) -> bool:
    return value is None or (isinstance(value, list) and len(value) == 2
                             and all(type(v) is int and v >= 0 for v in value))


def _index(value: object) -> bool:
    return type(value) is int and value >= 0


def _crc(value: object) -> bool:
    """A CRC-32."""
    return type(value) is int and 0 <= value < 1 << 32


def _data(value: object) -> bool:
    """Bytes (a request's payload), or hex of at most 1 MiB."""
    return isinstance(value, bytes) and 0 < len(value) <= MAX_PAYLOAD or _hex(value)


def _hex(value: object) -> bool:
    try:
        return isinstance(value, str) and 0 < len(bytes.fromhex(value)) <= 1 << 20
    except ValueError:
        return False


def _address(value: object) -> bool:
    """HOST:PORT of a peer daemon."""
    return isinstance(value, str) and value.rpartition(":")[2].isdigit() and 0 < len(value) <= 300


def _qmp_arguments(value: object) -> bool:
    """A QMP command's arguments; a migration URI among them must be one
    :func:`_uri` takes."""
    return isinstance(value, dict) and ("uri" not in value or _uri(value["uri"]))


def _options(value: object) -> bool:
    number = (int, float)
    kinds = {"threshold": int, "min_precopy": number, "max_precopy": number,
             "downtime_limit": int, "max_downtime_limit": int, "page_request_timeout": number, "device_timeout": number,
             "timeout": number, "max_pause": number, "device_flags": int, "compare_regions": list,
             "verify_ram": bool, "repair_ram": bool, "debug": list}
    return isinstance(value, dict) and all(
        key in kinds and isinstance(v, kinds[key]) and (kinds[key] is bool or not isinstance(v, bool))
        for key, v in value.items())


#: op -> argument -> its test; arguments not listed are refused, and
#: :func:`check_args` names the ones an op cannot do without.
ARGUMENTS = {
    "attach": {"name": _name, "qmp": _path, "ram": _path, "devices": _paths,
               "protocol": lambda v: v in (None, "v1", "v2"), "start_ring": _ring,
               "libvirt": lambda v: v in (None, "refuse", "follow")},
    "detach": {"name": _name, "when_idle": lambda v: isinstance(v, bool)},
    "status": {},
    "migrations": {},
    "migrate": {"src": _name, "dst": _name, "uri": _uri, "trace": lambda v: v is None or _path(v),
                "options": lambda v: v is None or _options(v), "peer": lambda v: v is None or _address(v)},
    "migrate_libvirt": {"domain": _name, "to": _libvirt_uri, "peer": _address,
                        "migrate_uri": lambda v: v is None or _uri(v), "trace": lambda v: v is None or _path(v),
                        "options": lambda v: v is None or _options(v)},
    "shutdown": {},
    "region": {"vm": _name, "device": _name, "index": _index, "offset": _index,
               "count": lambda v: _index(v) and 0 < v <= 1 << 20, "data": _hex},
    "expect": {"domain": _name, "migration": _name,
               "seconds": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 3600},
    "expected": {"domain": _name, "migration": _name},
    "ram_write": {"vm": _name, "migration": _name, "crc": _crc,
                  "pages": lambda v: isinstance(v, list) and 0 < len(v) <= PAGES_PER_WRITE
                  and all(map(_index, v)),
                  "data": _data},
    "ram_crcs": {"vm": _name, "migration": _name},
    "incoming_qmp": {"vm": _name, "migration": _name, "command": _name,
                     "arguments": lambda v: v is None or _qmp_arguments(v)},
    "incoming_end": {"vm": _name, "migration": _name},
    "incoming_wait": {"vm": _name, "migration": _name, "timeout": _seconds(120)},
    "incoming_resume": {"vm": _name, "migration": _name},
    "incoming_watch": {"vm": _name, "migration": _name, "since": lambda v: type(v) is int and v >= -1,
                       "timeout": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 30},
    "incoming_device": {"vm": _name, "migration": _name, "device": _name, "call": _name,
                        "state": lambda v: isinstance(v, str) and v in MigState.__members__, "data": _data,
                        "crc": _crc},
}


def check_args(op: str, args: dict) -> None:
    """ControlError unless every argument of a request is one ``op`` takes,
    of the right kind (paths absolute, numbers numbers)."""
    spec = ARGUMENTS.get(op, {})
    for key, value in args.items():
        if key not in spec:
            raise ControlError(f"unexpected argument {key!r}")
        if not spec[key](value):
            raise ControlError(f"{key}: {value!r} is not acceptable")
    required = {"attach": ("name", "qmp", "devices"), "detach": ("name",),
                "migrate": ("src", "dst", "uri"), "region": ("vm", "device", "index", "offset"),
                "expect": ("domain", "migration"), "expected": ("domain", "migration"),
                "ram_write": ("vm", "migration", "pages", "data", "crc"),
                "ram_crcs": ("vm", "migration"), "incoming_qmp": ("vm", "migration", "command"),
                "incoming_watch": ("vm", "migration", "since"), "incoming_end": ("vm", "migration"),
                "incoming_device": ("vm", "migration", "device", "call"),
                "incoming_wait": ("vm", "migration"), "incoming_resume": ("vm", "migration"),
                "migrate_libvirt": ("domain", "to", "peer")}.get(op, ())
    if missing := [key for key in required if key not in args]:
        raise ControlError(f"missing {', '.join(missing)}")


class LineReader:
    """Bytes in, JSON objects out, one per line; a request's payload comes
    out as its ``args["data"]``."""

    def __init__(self):
        self._buf = bytearray()
        #: A message whose payload is still arriving, and the payload's size.
        self._waiting: tuple[dict, int] | None = None

    def feed(self, data: bytes) -> list[dict]:
        self._buf += data
        out = []
        while True:
            if self._waiting:
                message, size = self._waiting
                if len(self._buf) < size:
                    break
                message.setdefault("args", {})["data"] = bytes(self._buf[:size])
                del self._buf[:size]
                self._waiting = None
                out.append(message)
                continue
            end = self._buf.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buf[:end])
            del self._buf[:end + 1]
            message = self._decode(line)
            size = message.pop("payload", 0)
            if size:
                if type(size) is not int or not 0 < size <= MAX_PAYLOAD or not isinstance(message.get("args", {}), dict):
                    raise ControlError(f"a payload of {size!r} bytes")
                self._waiting = (message, size)
            else:
                out.append(message)
        if len(self._buf) > MAX_LINE and not self._waiting:
            raise ControlError(f"a line longer than {MAX_LINE} bytes")
        return out

    @staticmethod
    def _decode(line: bytes) -> dict:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as err:     # ValueError: also an int past 4300 digits
            raise ControlError(f"not JSON: {err}") from None
        if not isinstance(message, dict):
            raise ControlError("not a JSON object")
        return message
