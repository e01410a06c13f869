"""The ``qmpmig`` command's side of the control socket: one request, one
reply; and starting the host's daemon when none runs."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from pathlib import Path

from . import control

_ids = itertools.count(1)


async def call(run_dir: Path, op: str, **args) -> dict:
    """Ask the daemon of ``run_dir``; its result, or ControlError with its answer."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(Path(run_dir) / control.SOCKET))
    except (FileNotFoundError, ConnectionRefusedError) as err:
        raise control.ControlError(f"no qmpmig daemon at {run_dir} ({err.strerror}): "
                                   "start one with `qmpmig daemon`") from None
    msg_id = next(_ids)
    try:
        writer.write(control.request(msg_id, op, args))
        await writer.drain()
        lines = control.LineReader()
        while data := await reader.read(1 << 16):
            for message in lines.feed(data):
                if message.get("ok"):
                    return message.get("result", {})
                raise control.ControlError(message.get("error") or "the daemon refused without a reason")
        raise control.ControlError(f"the daemon closed the connection before answering {op}")
    finally:
        writer.close()


async def running(run_dir: Path) -> bool:
    try:
        await call(run_dir, "status")
    except control.ControlError:
        return False
    return True


async def ensure_daemon(run_dir: Path, timeout: float = 15.0) -> None:
    """Start ``qmpmig daemon`` for ``run_dir`` unless one answers there; it
    lives on in a session of its own, its output in ``run_dir/daemon.log``."""
    if await running(run_dir):
        return
    Path(run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(Path(run_dir) / "daemon.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qmpmig", "daemon", "--run-dir", str(run_dir)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while not await running(run_dir):
        if proc.poll() is not None:
            raise control.ControlError(f"qmpmig daemon exited ({proc.returncode}); see {run_dir}/daemon.log")
        if time.monotonic() > deadline:
            raise control.ControlError(f"qmpmig daemon did not answer within {timeout:.0f} s")
        await asyncio.sleep(0.05)
