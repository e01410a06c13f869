"""qmpmig migrate on real QEMU with reference devices doing DMA into guest
RAM: the reference flows end to end, the negative controls that must make
each check fail, and the failures the source must survive."""

import asyncio
import os
import signal
import time

import pytest

from qmpmig.controller import Options
from qmpmig.rig.launch import LaunchOptions, launch

pytestmark = pytest.mark.qemu


def options(**kw) -> LaunchOptions:
    ctl = kw.pop("controller", {})
    return LaunchOptions(state_size=kw.pop("state_size", "4M"), controller=Options(**ctl), **kw)


def open_fds() -> dict[int, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def rules(report) -> set[str]:
    return {v.rule for v in report.violations}


def kinds(report) -> dict[str, int]:
    out: dict[str, int] = {}
    for rec in report.records:
        out[rec["kind"]] = out.get(rec["kind"], 0) + 1
    return out


@pytest.mark.parametrize("devices", [1, 4])
@pytest.mark.parametrize("protocol", ["v2", "v1"])
async def test_live_migration_with_devices(guest_image, protocol, devices):
    fds = open_fds()
    report = await launch(options(devices=devices, protocol=protocol))
    # Every device connection, DMA map, QMP session and RAM file closed:
    # the controller's descriptors do not grow with devices or migrations.
    assert open_fds() == fds
    assert report.summary.ok, report.summary.message
    assert report.checks and not any(report.checks.values()), report.checks
    assert report.violations == []
    assert report.heartbeat[1] > report.heartbeat[0]
    assert report.summary.device_bytes > devices * (4 << 20)
    assert report.summary.dma_pages_copied > 0
    assert "source QEMU settings" in report.checks
    states = [(r["side"], r["device"], r["to"]) for r in report.records if r["kind"] == "device_state"]
    assert ("src", "dev0", "PRE_COPY_P2P") in states and ("dst", "dev0", "RUNNING_P2P") in states
    assert kinds(report)["barrier"] >= 2


async def test_page_requests_complete_before_the_vcpus_stop(guest_image):
    report = await launch(options(devices=2, fault_stride=4, dma_rate=2000))
    assert report.summary.ok, report.summary.message
    assert not any(report.checks.values()), report.checks
    assert report.violations == []
    assert kinds(report).get("page_request", 0) > 0
    assert kinds(report)["page_request"] == kinds(report)["page_complete"]


async def test_without_pre_copy_flags(guest_image):
    report = await launch(options(devices=2, mig_flags="STOP_COPY,P2P"))
    assert report.summary.ok and not any(report.checks.values()) and report.violations == [], report.checks


# -- negative controls: each must make its check fail ---------------------------


async def test_negative_control_no_dirty_copy_leaves_stale_guest_memory(guest_image):
    report = await launch(options(devices=1, dma_rate=2000, controller={"debug": frozenset({"no-dirty-copy"})}))
    assert report.summary.ok
    assert report.checks["dev0 DMA records"] and "wrong in destination RAM" in report.checks["dev0 DMA records"]
    assert "cont-after-copy" in rules(report)


async def test_negative_control_vcpu_stop_before_ndma(guest_image):
    report = await launch(options(devices=2, fault_stride=2, dma_rate=2000,
                                  controller={"debug": frozenset({"stop-before-ndma"}),
                                              "page_request_timeout": 3.0}))
    assert "vcpu-stop" in rules(report)
    assert not report.summary.ok and "page requests stuck" in report.summary.message
    # The source survives it: guest and devices run on with their state.
    assert not any(report.checks.values()), report.checks


async def test_negative_control_device_past_the_barrier_early(guest_image):
    report = await launch(options(devices=2, controller={"debug": frozenset({"early-barrier"})}))
    assert rules(report) == {"barrier"}, report.violations


async def test_qemu_switching_over_early_is_cancelled_and_retried(guest_image):
    # Without the hold, and with the devices kept in pre-copy, QEMU's RAM
    # converges first and it stops the vCPUs itself.
    report = await launch(options(devices=1, controller={"debug": frozenset({"no-hold"}), "attempts": 2,
                                                         "min_precopy": 10.0}))
    retries = [r for r in report.records if r["kind"] == "phase" and r["name"] == "retry"]
    assert retries and "switched over by itself" in retries[0]["reason"]
    assert not report.summary.ok and "switched over" in report.summary.message
    assert report.violations == []
    assert not any(report.checks.values()), report.checks


# -- failures the source survives ------------------------------------------------


async def in_phase(controller, phase: str, timeout: float = 60) -> None:
    for _ in range(int(timeout / 0.05)):
        if controller.phase == phase:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"never reached {phase}")


LONG_PRECOPY = {"min_precopy": 30.0}


async def test_cancel_during_precopy(guest_image):
    async def cancel(rig, controller):
        await in_phase(controller, "precopy")
        await asyncio.sleep(0.5)
        await rig.src_qmp.execute("migrate_cancel")

    report = await launch(options(devices=2, controller=LONG_PRECOPY), during=cancel)
    assert not report.summary.ok and "cancel" in report.summary.message
    assert not any(report.checks.values()), report.checks
    assert report.violations == []
    results = [r for r in report.records if r["kind"] == "result"]
    assert len(results) == 1 and not results[0]["ok"] and "cancel" in results[0]["message"]
    # The source's QEMU is as it was; the destination, which had begun to
    # receive the guest, is gone.
    assert "source QEMU settings" in report.checks and "destination QEMU ended" in report.checks


async def test_destination_qemu_killed_during_precopy(guest_image):
    async def kill(rig, controller):
        await in_phase(controller, "precopy")
        await asyncio.sleep(0.5)
        rig.dst.kill()

    report = await launch(options(devices=2, controller=LONG_PRECOPY), during=kill)
    assert not report.summary.ok and "destination QEMU died" in report.summary.message
    assert not any(report.checks.values()), report.checks
    assert report.violations == []


async def test_destination_device_process_killed_during_precopy(guest_image):
    async def kill(rig, controller):
        await in_phase(controller, "precopy")
        await asyncio.sleep(0.5)
        rig.devices[1][1].kill()

    report = await launch(options(devices=2, controller=LONG_PRECOPY), during=kill)
    assert not report.summary.ok and "dev1" in report.summary.message
    assert not any(report.checks.values()), report.checks
    assert "destination QEMU ended" in report.checks


async def test_postcopy_is_refused_before_anything_starts(guest_image):
    async def postcopy(rig, controller):
        await rig.src_qmp.set_capabilities(postcopy_ram=True)

    report = await launch(options(devices=1), during=postcopy)
    assert not report.summary.ok and "postcopy" in report.summary.message
    commands = [r["command"] for r in report.records if r["kind"] == "qmp_command"]
    assert "migrate" not in commands and "migrate-incoming" not in commands
    assert not any(report.checks.values()), report.checks


async def test_paused_guest_migrates_paused_with_devices_stopped(guest_image):
    async def pause(rig, controller):
        await rig.src_qmp.execute("stop")

    report = await launch(options(devices=2), during=pause)
    assert report.summary.ok, report.summary.message
    assert report.checks and not any(report.checks.values()), report.checks
    assert report.violations == []
    commands = [r["command"] for r in report.records if r["kind"] == "qmp_command"]
    assert "cont" not in commands and "stop" not in commands
    src_states = [r["to"] for r in report.records if r["kind"] == "device_state" and r["side"] == "src"]
    assert "PRE_COPY" not in src_states and src_states[-1] == "STOP"


async def test_a_hung_destination_device_fails_the_migration_naming_it(guest_image):
    """A device that stops answering (SIGSTOP) fails the migration within
    the device timeout, by name and step; the source runs on with its
    devices, the destination QEMU is ended."""
    async def hang(rig, controller):
        await in_phase(controller, "precopy")
        await asyncio.sleep(0.3)
        os.kill(rig.devices[1][1].pid, signal.SIGSTOP)

    t0 = time.monotonic()
    report = await launch(options(devices=2, controller={**LONG_PRECOPY, "device_timeout": 2.0}), during=hang)
    assert not report.summary.ok
    assert "dst device dev1 did not answer" in report.summary.message and "within 2.0 s" in report.summary.message
    assert "source VM running" in report.summary.message and "dev1 RUNNING" in report.summary.message
    assert not any(report.checks.values()), report.checks
    assert "destination QEMU ended" in report.checks
    assert time.monotonic() - t0 < 90


async def test_a_failure_after_every_destination_device_loaded_goes_forward(guest_image):
    """The source device dies after the switchover: every destination device
    had loaded its state, so the guest's place is the destination; the
    source must never be started again (two copies of the guest)."""
    async def kill_source_device(rig, controller):
        for _ in range(12000):
            if controller.phase in ("switchover", "resume"):
                break
            await asyncio.sleep(0.005)
        rig.devices[0][0].kill()

    report = await launch(options(devices=1), during=kill_source_device)
    assert not report.summary.ok and report.summary.guest_on == "destination", report.summary.message
    assert "stays on the destination" in report.summary.message
    assert report.checks["source stopped"] is None and report.checks["heartbeat"] is None, report.checks


async def test_a_device_hung_with_the_guest_paused_keeps_it_paused_only_briefly(guest_image):
    """The source device stops answering (SIGSTOP) in stop-copy, with the
    vCPUs stopped: the guest runs again within --max-pause of the fault (the
    pause measured from QEMU's own STOP and RESUME events), and the message
    names the device and the step."""
    async def hang(rig, controller):
        for _ in range(24000):
            if controller.phase == "stop-copy":
                break
            await asyncio.sleep(0.005)
        device = rig.devices[0][0]
        os.kill(device.pid, signal.SIGSTOP)
        await asyncio.sleep(6)                  # recovery may then bring it back
        os.kill(device.pid, signal.SIGCONT)

    report = await launch(options(devices=1, state_size="64M", controller={"max_pause": 3.0}), during=hang)
    assert not report.summary.ok and "src device dev0 did not answer" in report.summary.message
    assert "with the guest paused" in report.summary.message, report.summary.message
    events = [(r["t"], r["event"]) for r in report.records
              if r["kind"] == "qmp_event" and r["side"] == "src" and r["event"] in ("STOP", "RESUME")]
    stops = [t for t, e in events if e == "STOP"]
    resumes = [t for t, e in events if e == "RESUME" and stops and t > stops[-1]]
    assert stops and resumes and resumes[0] - stops[-1] < 3.0, events
    assert not any(report.checks.values()), report.checks


PHASES = ("setup", "precopy", "grace", "stop-copy", "switchover", "resume")


@pytest.mark.parametrize("side", ["src", "dst"])
@pytest.mark.parametrize("phase", PHASES)
async def test_a_device_killed_in_any_phase(guest_image, side, phase):
    """A device process SIGKILLed in each phase: the guest runs on exactly
    one side (the destination only once every device there had loaded its
    state), the other side's QEMU is ended or stopped, and the message names
    the device."""
    async def kill(rig, controller):
        for _ in range(24000):
            if controller.phase == phase:
                break
            await asyncio.sleep(0.002)
        rig.devices[0][0 if side == "src" else 1].kill()

    report = await launch(options(devices=1, state_size="16M"), during=kill)
    summary = report.summary
    if summary.ok:
        pytest.skip(f"the migration was through before the kill landed in {phase}")
    assert f"{side} device dev0" in summary.message, summary.message
    if summary.guest_on == "destination":
        assert report.checks["heartbeat"] is None and report.checks["source stopped"] is None, report.checks
    else:
        assert report.checks["source heartbeat"] is None, report.checks
        assert report.checks.get("destination QEMU ended") in (None, "skipped"), report.checks
