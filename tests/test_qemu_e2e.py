"""Real QEMU: live migration of the test guest between two local QEMUs, and
the ways it ends badly.  Every (run state, migration status) either side
reports must be one the lifecycle table maps."""

import asyncio

import pytest

from qmpmig.migration import lifecycle
from qmpmig.errors import QemuGone
from qmpmig.qemu.qmp import VmState
from qmpmig.qemu.qmp import FINAL
from qmpmig.migration.states import MigFlags

pytestmark = pytest.mark.qemu
ALL = MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY


def assert_mapped(rig):
    """The lifecycle table answers every tuple either side was seen in."""
    for side, role in (("src", "source"), ("dst", "destination")):
        for state in rig.seen[side].tuples:
            for flags in (MigFlags.STOP_COPY, ALL):
                lifecycle.target(role, state.runstate, state.status, flags)


async def settles_at(rig, side: str, state: VmState, timeout: float = 10.0) -> None:
    """Wait until the last state seen on ``side`` is ``state`` (QEMU moves to
    postmigrate and running without an event: the observer's poll sees it)."""
    async with asyncio.timeout(timeout):
        while not rig.seen[side].tuples or rig.seen[side].tuples[-1] != state:
            await asyncio.sleep(0.05)


async def heartbeat_goes_on(vm, timeout=30.0):
    beat = vm.last_heartbeat()
    return await asyncio.to_thread(vm.wait_heartbeat, beat + 2, timeout)


async def test_live_migration_heartbeat_continues_on_destination(rig):
    before = rig.src.last_heartbeat()
    info = await rig.migrate()
    assert info.status == "completed" and info.ram_transferred > 0
    last_on_src = rig.src.last_heartbeat()
    assert last_on_src >= before
    # The destination resumes the same guest: its first heartbeat continues
    # the source's count, it does not boot and start at 1.
    beat = await asyncio.to_thread(rig.dst.wait_heartbeat, last_on_src, 30)
    assert rig.dst.heartbeats()[0] > last_on_src - 1 and beat > last_on_src
    assert 1 not in rig.dst.heartbeats()
    await rig.wait_status("dst", "completed")
    await settles_at(rig, "src", VmState("postmigrate", "completed"))
    await settles_at(rig, "dst", VmState("running", "completed"))
    src, dst = rig.seen["src"].tuples, rig.seen["dst"].tuples
    assert src[0] == VmState("running", "none")
    assert VmState("running", "active") in src
    assert src[-1] == VmState("postmigrate", "completed")
    assert dst[0] == VmState("inmigrate", "none")
    assert VmState("inmigrate", "active") in dst
    assert VmState("paused", "completed") in dst
    assert dst[-1] == VmState("running", "completed")
    assert_mapped(rig)


async def test_cancelled_migration_leaves_the_source_running(rig):
    # 1 MiB/s cannot keep up with the guest's dirtying: it stays active.
    await rig.start_migration(max_bandwidth=1 << 20)
    await rig.wait_status("src", "active")
    await asyncio.sleep(1)
    await rig.src_qmp.execute("migrate_cancel")
    state = await rig.wait_status("src", FINAL)
    assert state == VmState("running", "cancelled")
    assert (await rig.src_qmp.query_status()).running
    await heartbeat_goes_on(rig.src)
    assert VmState("running", "cancelling") in rig.seen["src"].tuples
    assert_mapped(rig)


async def test_destination_killed_mid_migration_source_keeps_running(rig):
    await rig.start_migration(max_bandwidth=1 << 20)
    await rig.wait_status("src", "active")
    await rig.wait_status("dst", "active")
    rig.dst.kill()
    state = await rig.wait_status("src", FINAL)
    assert state == VmState("running", "failed")
    info = await rig.src_qmp.query_migrate()
    assert info.status == "failed"
    await heartbeat_goes_on(rig.src)
    for _ in range(50):
        if rig.seen["dst"].gone:
            break
        await asyncio.sleep(0.1)
    assert rig.seen["dst"].gone and "lost" in rig.seen["dst"].gone
    with pytest.raises(QemuGone):
        await rig.dst_qmp.query_status()
    assert_mapped(rig)


async def test_paused_guest_migrates_paused(rig):
    await rig.src_qmp.execute("stop")
    beat = rig.src.last_heartbeat()
    await rig.start_migration()
    assert (await rig.wait_status("src", FINAL)).status == "completed"
    await rig.wait_status("dst", "completed")
    await settles_at(rig, "src", VmState("postmigrate", "completed"))
    await settles_at(rig, "dst", VmState("paused", "completed"))
    src, dst = rig.seen["src"].tuples, rig.seen["dst"].tuples
    assert VmState("paused", "active") in src or VmState("paused", "setup") in src
    assert all(s.runstate != "running" for s in src[1:])
    assert dst[-1] == VmState("paused", "completed")
    assert rig.src.last_heartbeat() <= beat + 1
    await rig.dst_qmp.execute("cont")
    assert await heartbeat_goes_on(rig.dst) > beat
    assert_mapped(rig)


async def test_qemu_gone_is_an_exception_not_a_hang(rig):
    rig.src.kill()
    with pytest.raises(QemuGone):
        async with asyncio.timeout(10):
            async for _ in rig.src_qmp.states():
                pass
