"""The ``qmpmig`` command's side of the control socket: one request, one
reply; and starting the host's daemon when none runs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import control

_ids = itertools.count(1)


#: Seconds a request other than ``migrate`` may take to be answered.
ANSWER_WITHIN = 60.0


async def call(run_dir: Path, op: str, **args) -> dict:
    """Ask the daemon of ``run_dir``; its result, or ControlError with its
    answer.  A migration (or a detach that waits for one) is answered when
    it ends; any other request must be answered within
    :data:`ANSWER_WITHIN` seconds."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(Path(run_dir) / control.SOCKET))
    except (FileNotFoundError, ConnectionRefusedError) as err:
        raise control.ControlError(f"no qmpmig daemon at {run_dir} ({err.strerror}): "
                                   "start one with `qmpmig daemon`") from None
    try:
        async with asyncio.timeout(None if op in ("migrate", "migrate_libvirt") or args.get("when_idle")
                                   else ANSWER_WITHIN):
            return await _exchange(reader, writer, op, args)
    except TimeoutError:
        raise control.ControlError(f"the daemon did not answer {op} within {ANSWER_WITHIN:.0f} s") from None
    finally:
        writer.close()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, op: str, args: dict) -> dict:
    writer.write(control.request(next(_ids), op, args))
    await writer.drain()
    lines = control.LineReader()
    while data := await reader.read(1 << 16):
        for message in lines.feed(data):
            if message.get("ok"):
                return message.get("result", {})
            raise control.ControlError(message.get("error") or "the daemon refused without a reason")
    raise control.ControlError(f"the daemon closed the connection before answering {op}")


async def reporting(run_dir: Path, request: Awaitable[dict], progress: Callable[[dict], None] | None,
                    src: str, every: float = 0.5) -> dict:
    """Await a ``migrate`` request, showing ``progress`` each migration of
    VM ``src`` the daemon's status lists meanwhile."""
    task = asyncio.ensure_future(request)
    while progress and not task.done():
        await asyncio.wait({task}, timeout=every)
        if not task.done():
            with contextlib.suppress(control.ControlError, OSError):
                for migration in (await call(run_dir, "migrations"))["migrations"]:
                    if migration["src"] == src:
                        progress(migration)
    return await task


async def running(run_dir: Path) -> bool:
    try:
        await call(run_dir, "status")
    except control.ControlError:
        return False
    return True


async def ensure_daemon(run_dir: Path, timeout: float = 15.0) -> None:
    """Start ``qmpmig daemon`` for ``run_dir`` unless one answers there; it
    lives on in a session of its own, its output in ``run_dir/daemon.log``."""
    if not await running(run_dir):
        await start_daemon(run_dir, timeout, start_new_session=True)


async def start_daemon(run_dir: Path, timeout: float = 15.0, **popen) -> subprocess.Popen:
    """``qmpmig daemon --run-dir run_dir``, once it answers; ``popen`` says
    how the process is started (its own session, or dying with its starter)."""
    Path(run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(Path(run_dir) / "daemon.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qmpmig", "daemon", "--run-dir", str(run_dir)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **popen)
    deadline = time.monotonic() + timeout
    while not await running(run_dir):
        if proc.poll() is not None:
            raise control.ControlError(f"qmpmig daemon exited ({proc.returncode}); see {run_dir}/daemon.log")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise control.ControlError(f"qmpmig daemon did not answer within {timeout:.0f} s")
        await asyncio.sleep(0.05)
    return proc
