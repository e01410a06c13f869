"""The daemon's control protocol, without I/O: one JSON object per line.

A request is ``{"id": N, "op": NAME, "args": {...}}``; its reply is
``{"id": N, "ok": true, "result": {...}}`` or ``{"id": N, "ok": false,
"error": TEXT}``.  A line longer than :data:`MAX_LINE` or that is not a JSON
object is a :class:`ControlError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import QmpmigError

MAX_LINE = 1 << 20
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


def request(msg_id: int, op: str, args: dict) -> bytes:
    return encode({"id": msg_id, "op": op, "args": args})


def reply(msg_id: int, result: dict | None = None, error: str | None = None) -> bytes:
    if error is not None:
        return encode({"id": msg_id, "ok": False, "error": error})
    return encode({"id": msg_id, "ok": True, "result": result or {}})


class LineReader:
    """Bytes in, JSON objects out, one per line."""

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict]:
        self._buf += data
        out = []
        while (end := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:end])
            del self._buf[:end + 1]
            out.append(self._decode(line))
        if len(self._buf) > MAX_LINE:
            raise ControlError(f"a line longer than {MAX_LINE} bytes")
        return out

    @staticmethod
    def _decode(line: bytes) -> dict:
        try:
            message = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ControlError(f"not JSON: {err}") from None
        if not isinstance(message, dict):
            raise ControlError("not a JSON object")
        return message
