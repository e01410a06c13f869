"""``qmpmig libvirt ...``: the hook and what it starts.  Dispatched before
the rest of the command line tool is imported: the hook runs while libvirt
waits."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
from pathlib import Path

from ..daemon.control import default_run_dir
from ..errors import QmpmigError

#: Where libvirt (6.5 and later) runs every executable, for every domain.
HOOKS_DIR = Path("/etc/libvirt/hooks/qemu.d")
HOOK_NAME = "qmpmig"


def install_hook(hooks_dir: Path, run_dir: Path) -> Path:
    """Write the hook: a shell script that runs this interpreter's qmpmig.
    libvirt reads its hooks when it starts: restart libvirtd after."""
    hooks_dir.mkdir(parents=True, exist_ok=True)
    path = hooks_dir / HOOK_NAME
    env = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " if os.environ.get("PYTHONPATH") else ""
    staging = path.with_suffix(".new")
    staging.write_text(
        "#!/bin/sh\n"
        "# qmpmig's libvirt hook (written by 'qmpmig libvirt install-hook'): starts and stops the\n"
        "# qmpmig devices a domain declares, hands them to the host's daemon, and refuses an\n"
        "# incoming migration of such a domain that qmpmig does not drive.\n"
        f"exec env {env}{shlex.quote(sys.executable)} -m qmpmig libvirt hook "
        f"--run-dir {shlex.quote(str(run_dir))} \"$@\"\n")
    staging.chmod(0o755)
    staging.replace(path)
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qmpmig libvirt", description="qmpmig under libvirt")
    p.add_argument("--run-dir", type=Path, default=default_run_dir(), help="the daemon's run directory")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("install-hook", help=f"install the hook in {HOOKS_DIR} (restart libvirtd after)")
    i.add_argument("--hooks-dir", type=Path, default=HOOKS_DIR)
    h = sub.add_parser("hook", help="what libvirt runs: <domain> <operation> <sub-operation> [extra]; XML on stdin")
    h.add_argument("args", nargs=argparse.REMAINDER)
    a = sub.add_parser("adopt", help="the daemon takes a started domain's devices (the hook starts this)")
    a.add_argument("domain")
    a.add_argument("--monitor", required=True)
    a.add_argument("--device", action="append", required=True)
    a.add_argument("--incoming", choices=("refuse", "follow"), default="refuse")
    g = sub.add_parser("let-go", help="the daemon lets go of a domain; its device processes stop")
    g.add_argument("domain")
    g.add_argument("--monitor")
    g.add_argument("--started", type=json.loads, default=[],
                   help="the device processes the hook started, as its record had them (JSON)")
    for s in (i, h, a, g):
        s.add_argument("--run-dir", type=Path, default=argparse.SUPPRESS)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    run_dir = Path(args.run_dir).absolute()
    try:
        if args.command == "install-hook":
            print(f"installed {install_hook(args.hooks_dir, run_dir)}; restart libvirtd for it to be used")
        elif args.command == "hook":
            from .hook import run
            return run(args.args, sys.stdin.read(), run_dir)
        elif args.command == "adopt":
            from .handover import adopt
            asyncio.run(adopt(args.domain, args.monitor, args.device, run_dir, args.incoming))
            print(f"qmpmig: {args.domain}: the daemon owns its devices")
        else:
            from .handover import let_go
            asyncio.run(let_go(args.domain, run_dir, args.started))
    except QmpmigError as err:
        print(f"qmpmig libvirt {args.command}: {err}", file=sys.stderr)
        return 1
    return 0
