#!/usr/bin/env python3
"""Show QEMU's own RAM migration losing guest stores under TCG (QEMU < 9.0).

No qmpmig controller and no device: two QEMUs of the test guest, a plain
migration whose RAM iterations are kept going for --hold seconds (bandwidth
--bandwidth MiB/s, downtime-limit 1 ms, so QEMU syncs its dirty bitmap again
and again while the guest runs), then let complete.  With the destination
loaded and not yet started, both guest RAM files are compared page by page:
every differing page is a store QEMU never sent.

    scripts/tcg-lost-stores.py              # the rig's guests (RAM padded)
    scripts/tcg-lost-stores.py --no-pad     # RAM a multiple of 256 KiB

docs/known-problems.md says why, and what the figures were here.
"""

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmpmig.qemu.guestmem import GuestRam  # noqa: E402
from qmpmig.qemu.qmp import FINAL  # noqa: E402
from qmpmig.rig import vm  # noqa: E402
from qmpmig.rig.pair import Rig  # noqa: E402


async def once(memory: int, hold: float, bandwidth: int) -> tuple[int, bool]:
    """(pages differing at switchover, the destination guest went on)."""
    async with Rig(memory_mib=memory, accel="tcg") as rig:
        q = rig.src_qmp
        await q.set_parameters(**{"downtime-limit": 1})
        await q.set_capabilities(events=True, pause_before_switchover=True)
        await rig.start_migration()
        while (await q.query_migrate()).raw.get("ram", {}).get("dirty-sync-count", 0) < 2:
            await asyncio.sleep(0.02)
        await q.set_parameters(**{"max-bandwidth": bandwidth << 20})
        await asyncio.sleep(hold)
        await q.set_parameters(**{"max-bandwidth": 1 << 30, "downtime-limit": 300})
        await rig.wait_status("src", {"pre-switchover"})
        await q.execute("migrate-continue", {"state": "pre-switchover"})
        await rig.wait_status("src", FINAL)
        await rig.wait_status("dst", "completed")
        src, dst = GuestRam(rig.src.ram_path), GuestRam(rig.dst.ram_path)
        try:
            differing = len(src.differing_pages(dst))
        finally:
            src.close()
            dst.close()
        await rig.dst_qmp.execute("cont")
        try:
            await asyncio.to_thread(rig.dst.wait_heartbeat, rig.src.last_heartbeat() + 4, 20)
            alive = True
        except Exception:
            alive = False
        return differing, alive


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--migrations", type=int, default=4)
    p.add_argument("--memory", type=int, default=256, help="guest MiB")
    p.add_argument("--hold", type=float, default=10.0, help="seconds of RAM iterations with the guest running")
    p.add_argument("--bandwidth", type=int, default=64, help="MiB/s during the hold")
    p.add_argument("--no-pad", action="store_true", help="guest RAM a multiple of 256 KiB (QEMU's fast sync)")
    args = p.parse_args()
    if args.no_pad:
        vm.TCG_RAM_PAD = 0
    print(f"QEMU {'.'.join(map(str, vm.qemu_version()))}, TCG, guest RAM "
          f"{(args.memory << 20) + vm.TCG_RAM_PAD} bytes", flush=True)
    lossy = 0
    for n in range(1, args.migrations + 1):
        differing, alive = await once(args.memory, args.hold, args.bandwidth)
        lossy += differing > 0
        print(f"migration {n}: {differing} pages differ at switchover; destination guest "
              f"{'went on' if alive else 'DIED'}", flush=True)
    print(f"{lossy} of {args.migrations} migrations lost stores")
    return 1 if lossy else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
