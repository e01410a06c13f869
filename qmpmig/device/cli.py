"""``qmpmig-device --socket PATH``: serve one reference device until stopped."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from ..migration.states import MigFlags
from .model import DEFECTS, DeviceConfig, ReferenceDevice
from ..vfio_user.transport import keep_large_buffers
from .service import run

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(text[:-1]) * UNITS[text[-1]] if text[-1:] in UNITS else int(text)


def mig_flags(text: str) -> int:
    flags = 0
    for name in filter(None, text.replace("|", ",").split(",")):
        flags |= MigFlags[name.strip().upper()]
    if not flags & MigFlags.STOP_COPY:
        raise argparse.ArgumentTypeError("STOP_COPY is mandatory")
    return flags


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qmpmig-device", description=__doc__)
    p.add_argument("--socket", required=True, help="UNIX socket to serve on")
    p.add_argument("--state-size", type=size, default=16 << 20, help="internal state (e.g. 16M, 1G)")
    p.add_argument("--migration", choices=("v2", "v1"), default="v2",
                   help="v2: DEVICE_FEATURE + MIG_DATA_*; v1: the migration region")
    p.add_argument("--mig-flags", type=mig_flags, default=MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY,
                   help="v2 migration flags, e.g. STOP_COPY,P2P,PRE_COPY")
    p.add_argument("--no-ndma", dest="ndma", action="store_false", help="v1: no NDMA bit")
    p.add_argument("--dma-rate", type=float, default=500.0, help="DMA records per second")
    p.add_argument("--mutate-rate", type=float, default=200.0, help="internal pages rewritten per second")
    p.add_argument("--fault-stride", type=int, default=0,
                   help="every Nth ring page is not present until a page request completes (0: none)")
    p.add_argument("--device-id", type=int, default=1)
    p.add_argument("--defect", action="append", default=[], choices=sorted(DEFECTS),
                   help="break one rule on purpose (for checkers' negative controls)")
    p.add_argument("--null-stream", type=size, default=0, metavar="SIZE",
                   help="bench mode: the stop-copy stream is SIZE bytes served from memory and a resume "
                        "discards it (no state migrates; measures the data path alone)")
    p.add_argument("--allow-uid", type=int, action="append", default=[], metavar="UID",
                   help="a uid besides root and this process's that may be the device's client (the socket is 0600 "
                        "all the same: the owner of its directory decides who reaches it)")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    keep_large_buffers()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="qmpmig-device[%(process)d] %(levelname)s %(message)s")
    config = DeviceConfig(state_size=args.state_size, migration=args.migration, mig_flags=args.mig_flags,
                          ndma=args.ndma, mutate_rate=args.mutate_rate, dma_rate=args.dma_rate,
                          fault_stride=args.fault_stride, device_id=args.device_id,
                          defects=frozenset(args.defect), null_stream=args.null_stream)

    async def serve() -> None:
        device = ReferenceDevice(config)
        task = asyncio.create_task(run(args.socket, device, allowed_uids=frozenset(args.allow_uid)))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        if "reset-on-sigusr1" in config.defects:
            loop.add_signal_handler(signal.SIGUSR1, device.reset)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
