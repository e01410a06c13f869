"""qmpmig migrate on real QEMU with reference devices doing DMA into guest
RAM: the reference flows end to end, the negative controls that must make
each check fail, and the failures the source must survive."""

import asyncio
import os
import signal
import time

import pytest

from qmpmig.controller import Options
from qmpmig.migration.states import MigFlags
from qmpmig.rig.launch import LaunchOptions, launch
from qmpmig.rig.vm import DMA_WINDOW

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
    # Every QMP session, daemon connection and RAM file of the rig closed.
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
    report = await launch(options(devices=1, dma_rate=2000, verify_ram=False,
                                  controller={"debug": frozenset({"no-dirty-copy"})}))
    assert report.summary.ok
    assert report.checks["dev0 DMA records"] and "wrong in destination RAM" in report.checks["dev0 DMA records"]
    assert "cont-after-copy" in rules(report)


@pytest.mark.parametrize("defect,where", [
    # The pages the device wrote by DMA, left stale: in its DMA window.
    ("no-dirty-copy", lambda gpa, rig_window: rig_window[0] <= gpa < rig_window[0] + rig_window[1]),
    # A byte flipped after QEMU's load, in the middle of RAM.
    ("corrupt-dst-ram", lambda gpa, rig_window: gpa >> 20 == 128),
])
async def test_negative_control_verify_ram_keeps_the_guest_on_the_source(guest_image, defect, where):
    report = await launch(options(devices=1, dma_rate=2000, controller={"debug": frozenset({defect})}))
    summary = report.summary
    assert not summary.ok and summary.guest_on == "source", summary.message
    assert "guest RAM differs from the source's" in summary.message
    verified = [r for r in report.records if r["kind"] == "ram_verify"]
    assert verified[-1]["differing"] > 0 and where(verified[-1]["first_gpa"], DMA_WINDOW)
    # Nothing ran at the destination; the source runs on with its device.
    assert report.violations == []
    assert not any(report.checks.values()), report.checks


async def test_repair_ram_copies_what_differs_from_the_stopped_source(guest_image):
    """--repair-ram with the corrupt-dst-ram control: the flipped page is
    found, copied again from the source's RAM (stopped, final), compared
    again, and the migration completes with the repair said."""
    report = await launch(options(devices=1, controller={"debug": frozenset({"corrupt-dst-ram"}),
                                                         "repair_ram": True}))
    summary = report.summary
    assert summary.ok and summary.ram_repaired == 4096, summary.message
    verified = [r["differing"] for r in report.records if r["kind"] == "ram_verify"]
    assert verified == [1, 0]
    assert [r["pages"] for r in report.records if r["kind"] == "ram_repair"] == [1]
    assert report.violations == [] and not any(report.checks.values()), report.checks


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


async def test_negative_control_switchover_before_the_end_of_stream(guest_image):
    # migrate-continue once the device is in STOP_COPY but before its stream
    # was read: the destination only runs after the device's state arrived
    # (it is paused until qmpmig's cont), but the rule is broken, and said.
    report = await launch(options(devices=1, controller={"debug": frozenset({"early-release"})}))
    assert rules(report) == {"end-of-stream"}, report.violations


async def test_qemu_switching_over_early_is_caught_and_the_source_runs_on(guest_image):
    # Without the hold, and with the devices kept in pre-copy, QEMU's RAM
    # converges first and it stops the vCPUs itself: the migration fails
    # saying so, the source runs on with its devices, the destination ends.
    report = await launch(options(devices=1, controller={"debug": frozenset({"no-hold"}), "min_precopy": 10.0}))
    assert not report.summary.ok and "switched over by itself" in report.summary.message
    assert report.violations == []
    assert not any(report.checks.values()), report.checks
    assert "destination QEMU ended" in report.checks


# -- failures the source survives ------------------------------------------------


LONG_PRECOPY = {"min_precopy": 30.0}


async def test_cancel_during_precopy(guest_image):
    async def cancel(rig, watch):
        await watch.wait_phase("precopy")
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
    async def kill(rig, watch):
        await watch.wait_phase("precopy")
        await asyncio.sleep(0.5)
        rig.dst.kill()

    report = await launch(options(devices=2, controller=LONG_PRECOPY), during=kill)
    assert not report.summary.ok and "destination QEMU died" in report.summary.message
    assert not any(report.checks.values()), report.checks
    assert report.violations == []


async def test_destination_device_process_killed_during_precopy(guest_image):
    async def kill(rig, watch):
        await watch.wait_phase("precopy")
        await asyncio.sleep(0.5)
        rig.devices[1][1].kill()

    report = await launch(options(devices=2, controller=LONG_PRECOPY), during=kill)
    assert not report.summary.ok and "dev1" in report.summary.message
    assert not any(report.checks.values()), report.checks
    assert "destination QEMU ended" in report.checks


async def test_postcopy_is_refused_before_anything_starts(guest_image):
    async def postcopy(rig, watch):
        await rig.src_qmp.set_capabilities(postcopy_ram=True)

    report = await launch(options(devices=1), during=postcopy)
    assert not report.summary.ok and "postcopy" in report.summary.message
    commands = [r["command"] for r in report.records if r["kind"] == "qmp_command"]
    assert "migrate" not in commands and "migrate-incoming" not in commands
    assert not any(report.checks.values()), report.checks


async def test_paused_guest_migrates_paused_with_devices_stopped(guest_image):
    async def pause(rig, watch):
        await rig.src_qmp.execute("stop")

    report = await launch(options(devices=2), during=pause)
    assert report.summary.ok, report.summary.message
    assert report.checks and not any(report.checks.values()), report.checks
    assert report.violations == []
    commands = [r["command"] for r in report.records if r["kind"] == "qmp_command"]
    assert "cont" not in commands and "stop" not in commands
    src_states = [r["to"] for r in report.records if r["kind"] == "device_state" and r["side"] == "src"]
    assert "PRE_COPY" not in src_states and src_states[-1] == "STOP"


async def test_a_failure_after_every_destination_device_loaded_goes_forward(guest_image):
    """The source device dies after the switchover: every destination device
    had loaded its state, so the guest's place is the destination; the
    source must never be started again (two copies of the guest)."""
    async def kill_source_device(rig, watch):
        await watch.wait_phase("switchover", "resume")
        rig.devices[0][0].kill()

    report = await launch(options(devices=1), during=kill_source_device)
    assert not report.summary.ok and report.summary.guest_on == "destination", report.summary.message
    assert "stays on the destination" in report.summary.message
    assert report.checks["source stopped"] is None and report.checks["heartbeat"] is None, report.checks


PHASES = ("setup", "precopy", "grace", "stop-copy", "switchover", "resume")
WHO = {"src": "source", "dst": "destination"}


async def fault_in(phase: str, fault: str, act, fault_cell, **opts):
    """A migration (one device, 16 MiB of state) with ``act(rig)`` done once
    it is in ``phase`` (or, for "loaded", once every destination device
    loaded); skipped if it was through first; the matrix cell recorded."""
    async def during(rig, watch):
        if await (loaded(rig) if phase == "loaded" else watch.wait_phase(phase)):
            act(rig)
            fault_cell.fault()

    report = await launch(options(devices=1, state_size="16M", **opts), during=during)
    summary = report.summary
    if summary.ok:
        pytest.skip(f"the migration was through before the fault landed in {phase}")
    fault_cell.outcome(fault, phase, summary.guest_on, report.ended, summary.message)
    return report


async def loaded(rig) -> bool:
    """Wait until the daemon's journal says every destination device
    loaded its state."""
    journal = rig.workdir / "daemon" / "journal.jsonl"
    async with asyncio.timeout(60):
        while not (journal.exists() and '"loaded"' in journal.read_text()):
            await asyncio.sleep(0.005)
    return True


@pytest.mark.parametrize("phase", PHASES + ("loaded",))
async def test_the_destination_qemu_killed_in_any_phase(guest_image, phase, fault_cell, nothing_left_behind):
    """The destination QEMU SIGKILLed in each phase: the migration fails
    saying the destination QEMU died, and the guest runs on at the source
    with its devices, also once every destination device had loaded its
    state as long as the destination's vCPUs were never started (the
    source, paused, its devices stopped and not reset, is the one copy
    left, and nothing diverged from it); a kill once the destination was
    started is a guest lost (the source never runs again once the
    destination ran it), which the summary says (guest_on "nowhere")."""
    # "loaded": every destination device loaded, the vCPUs not yet started
    # (the device's slow start, 3 s, holds that window open).
    report = await fault_in(phase, "destination QEMU SIGKILL", lambda rig: rig.dst.kill(), fault_cell,
                            device_defects=("slow-start",) if phase == "loaded" else ())
    summary = report.summary
    assert "destination QEMU died" in summary.message or "dst: QMP connection lost" in summary.message, \
        summary.message
    assert phase != "loaded" or summary.guest_on == "source", summary
    if summary.guest_on == "source":
        assert report.checks["source heartbeat"] is None and report.checks["source dev0"] is None, report.checks
        if phase == "loaded":
            assert "goes back to the source (the destination never ran it)" in summary.message, summary.message
    else:
        # Its place was the destination, which had started it: lost.
        assert summary.guest_on == "nowhere" and "the guest is lost" in summary.message, summary
        assert not any(report.checks.values()), report.checks
    assert report.violations == []


@pytest.mark.parametrize("side", ["src", "dst"])
@pytest.mark.parametrize("phase", PHASES)
async def test_a_device_killed_in_any_phase(guest_image, side, phase, fault_cell, nothing_left_behind):
    """A device process SIGKILLed in each phase: the guest runs on exactly
    one side (the destination only once every device there had loaded its
    state), the other side's QEMU is ended or stopped, and the message names
    the device."""
    report = await fault_in(phase, f"{WHO[side]} device SIGKILL",
                            lambda rig: rig.devices[0][0 if side == "src" else 1].kill(), fault_cell)
    summary = report.summary
    assert f"{side} device dev0" in summary.message, summary.message
    if summary.guest_on == "destination":
        assert report.checks["heartbeat"] is None and report.checks["source stopped"] is None, report.checks
    else:
        assert report.checks["source heartbeat"] is None, report.checks
        assert report.checks.get("destination QEMU ended") in (None, "skipped"), report.checks


@pytest.mark.parametrize("side", ["src", "dst"])
@pytest.mark.parametrize("phase", ("precopy", "grace", "stop-copy"))
async def test_a_device_reset_behind_qmpmigs_back_is_detected(guest_image, side, phase, fault_cell,
                                                              nothing_left_behind):
    """A device that resets itself without its client asking (the device's
    reset-on-sigusr1 defect: a function-level reset through another path,
    which no vfio-user message does; libvfio-user issue #853) in each phase,
    on each side: the controller, reading the device's state before each
    arc and after a failed request, finds it elsewhere than it left it; the
    migration fails naming the device and both states (a ``desync`` trace
    record), and the guest runs on at the source, the destination QEMU
    ended."""
    report = await fault_in(phase, f"{WHO[side]} device reset",
                            lambda rig: os.kill(rig.devices[0][0 if side == "src" else 1].pid, signal.SIGUSR1),
                            fault_cell, device_defects=("reset-on-sigusr1",))
    summary = report.summary
    if side == "src" and "reset or moved" not in summary.message:
        # A source reset while its stream flows can spoil the piece being
        # read; the destination then refuses the stream before the source is
        # looked at again: caught all the same, and said.
        assert "dst device dev0: a data write failed" in summary.message, summary.message
    else:
        assert "reset or moved by someone else" in summary.message, summary.message
        (desync,) = [r for r in report.records if r["kind"] == "desync"]
        assert desync["side"] == side and desync["device"] == "dev0" and desync["actual"] == "RUNNING", desync
        assert desync["expected"] != "RUNNING"
    assert summary.guest_on == "source" and report.violations == []
    for check in ("source heartbeat", "source stopped", "destination QEMU ended"):
        assert report.checks.get(check) is None, report.checks


@pytest.mark.parametrize("side", ["src", "dst"])
@pytest.mark.parametrize("phase", PHASES)
async def test_a_device_hung_in_any_phase(guest_image, side, phase, fault_cell, nothing_left_behind):
    """A device that stops answering (SIGSTOP) in each phase, on each side,
    and comes back (SIGCONT) once the migration is being recovered: the
    request it did not answer fails the migration within the device timeout
    (4 s), or, once the vCPUs are stopped, within --max-pause (3 s) less the
    recovery's margin, naming the device
    and the step; the guest runs on exactly one side; a paused guest runs
    again within --max-pause, measured from QEMU's own STOP and RESUME
    events; the destination QEMU never survives a failed migration."""
    hung = []

    async def hang(rig, watch):
        if not await watch.wait_phase(phase):
            return
        device = rig.devices[0][0 if side == "src" else 1]
        os.kill(device.pid, signal.SIGSTOP)
        hung.append(time.monotonic())
        fault_cell.fault()
        try:
            await watch.wait_phase("recover", timeout=30)
            await asyncio.sleep(1.0)
        finally:
            os.kill(device.pid, signal.SIGCONT)

    report = await launch(options(devices=1, state_size="16M",
                                  controller={"device_timeout": 4.0, "max_pause": 3.0}), during=hang)
    summary = report.summary
    if summary.ok:
        pytest.skip(f"the migration was through before the hang landed in {phase}")
    fault_cell.outcome(f"{WHO[side]} device SIGSTOP", phase, summary.guest_on, report.ended, summary.message)
    assert f"{side} device dev0 did not answer" in summary.message, summary.message
    events = [(r["t"], r["event"]) for r in report.records
              if r["kind"] == "qmp_event" and r["side"] == "src" and r["event"] in ("STOP", "RESUME")]
    stops = [t for t, e in events if e == "STOP"]
    if summary.guest_on == "destination":
        assert report.checks["heartbeat"] is None and report.checks["source stopped"] is None, report.checks
    else:
        assert not any(report.checks.values()), report.checks
        assert report.checks.get("destination QEMU ended", None) is None
        assert "dev0 RUNNING" in summary.message, summary.message
        if stops:
            resumes = [t for t, e in events if e == "RESUME" and t > stops[-1]]
            assert resumes and resumes[0] - stops[-1] < 3.0, events
            assert "with the guest paused" in summary.message, summary.message
        else:
            assert "within 4.0 s" in summary.message, summary.message


async def test_a_connection_cut_mid_reply_fails_the_migration_at_once(guest_image):
    """The source device closes its connection halfway through a 1 MiB
    MIG_DATA_READ reply (debug defect): the pending request fails at once
    with the reason, not at the device timeout (30 s); the source runs on
    and the destination QEMU is ended."""
    report = await launch(options(devices=1, state_size="16M", device_defects=("cut-data-reply",),
                                  controller={"device_flags": int(MigFlags.STOP_COPY | MigFlags.P2P)}))
    summary = report.summary
    assert not summary.ok and "src device dev0" in summary.message, summary.message
    assert "connection closed" in summary.message, summary.message
    assert summary.phases["stop-copy"] < 1.5, summary.phases
    assert report.checks["source heartbeat"] is None, report.checks
    assert report.checks["destination QEMU ended"] is None, report.checks


async def test_devices_run_during_qemus_ram_precopy_and_pause_only_at_its_end(guest_image):
    """The devices keep doing DMA (logged, and the dirtied pages copied)
    while QEMU sends guest RAM; QEMU is held only near the end of its
    first pass, and the grace state (no DMA) comes after that hold; the
    figures are QEMU's own (STOP and RESUME event timestamps) and the
    devices' acknowledgements."""
    report = await launch(options(devices=2, memory_mib=512, dma_rate=2000))
    assert report.summary.ok and report.violations == [], report.summary.message
    records = report.records
    migrate = next(r["seq"] for r in records if r["kind"] == "qmp_command" and r["command"] == "migrate")
    hold = next(r["seq"] for r in records if r["kind"] == "qmp_command" and r["command"] == "migrate-set-parameters"
                and r["arguments"].get("max-bandwidth") == 4 << 20)
    grace = next(r["seq"] for r in records if r["kind"] == "device_state" and r["to"] == "PRE_COPY_P2P")
    assert migrate < hold < grace
    during = [r for r in records if migrate < r["seq"] < grace and r["kind"] == "dma_dirty"]
    assert sum(r["pages"] for r in during) > 0, "no DMA logged while QEMU sent RAM"
    assert report.summary.dma_pages_copied > 0
    summary = report.summary
    stop = next(r["qemu_time"] for r in records if r["kind"] == "qmp_event" and r["side"] == "src"
                and r["event"] == "STOP")
    resume = next(r["qemu_time"] for r in records if r["kind"] == "qmp_event" and r["side"] == "dst"
                  and r["event"] == "RESUME")
    assert summary.downtime == pytest.approx(resume - stop, abs=1e-3) and summary.downtime > 0
    assert set(summary.device_outages) == {"dev0", "dev1"}
    assert summary.device_outage >= max(summary.device_outages.values()) > 0


async def test_a_device_that_does_not_converge_fails_with_the_figures_before_its_grace(guest_image):
    """A device that rewrites its state (256 MiB, more than the budget's
    worth at the rate it moves) faster than its pre-copy moves it (300,000
    pages a second): while the devices' pending data stops
    falling, the budget is raised step by step (300 -> 600 ms, the most
    allowed here); then the migration fails saying what was left, at what
    rates, against what budget, before any device stopped its DMA; the
    source runs on with its devices, the destination QEMU is ended."""
    report = await launch(options(devices=1, state_size="256M", mutate_rate=300_000,
                                  controller={"max_downtime_limit": 600}))
    summary = report.summary
    assert not summary.ok and "pre-copy does not converge" in summary.message, summary.message
    assert "KiB pending" in summary.message and "MiB/s" in summary.message and "budget of 600 ms" in summary.message
    budgets = [r["budget_ms"] for r in report.records if r["kind"] == "phase" and r["name"] == "budget"]
    assert budgets == [600], budgets
    states = {r["to"] for r in report.records if r["kind"] == "device_state" and r["side"] == "src"}
    assert "PRE_COPY_P2P" not in states and "STOP_COPY" not in states
    assert not any(report.checks.values()), report.checks
    assert report.checks["destination QEMU ended"] is None



@pytest.mark.parametrize("phase", PHASES)
async def test_the_source_qemu_killed_in_any_phase(guest_image, phase, fault_cell, nothing_left_behind):
    """The source QEMU SIGKILLed in each phase.  Before the destination had
    all of the guest (every destination device loaded) this cannot be made
    safe: the guest ran only at the source, so it is lost; the migration
    says so (guest_on "nowhere"), ends the destination QEMU (no half a
    guest may run) and the daemon lets every device of both VMs go.  After
    that the guest goes on at the destination."""
    report = await fault_in(phase, "source QEMU SIGKILL", lambda rig: rig.src.kill(), fault_cell)
    summary = report.summary
    assert "source QEMU died" in summary.message or "src: QMP connection lost" in summary.message, \
        summary.message
    if phase in ("setup", "precopy", "grace", "stop-copy"):
        assert summary.guest_on == "nowhere", summary
    if summary.guest_on == "nowhere":
        assert "the guest is lost" in summary.message, summary.message
        assert not any(report.checks.values()), report.checks
        assert set(report.checks) >= {"a QEMU gone", "devices let go"}
    else:
        assert summary.guest_on == "destination" and report.checks["heartbeat"] is None, report.checks
    assert report.violations == []


@pytest.mark.parametrize("how", ["flip", "truncate", "reorder", "duplicate", "replay"])
async def test_a_spoilt_device_stream_is_refused_and_the_source_runs_on(guest_image, how):
    """The device stream bent on its way (``--debug spoil-HOW``: a bit
    flipped, a piece cut short, two pieces swapped, one written twice, an
    earlier one replayed): the destination device refuses it every time
    (the data write fails, or leaving RESUMING does: ERROR), the migration
    fails naming the destination device, and the guest runs on at the
    source with its device RUNNING, the destination QEMU ended."""
    report = await launch(options(devices=1, state_size="16M", controller={"debug": frozenset({f"spoil-{how}"})}))
    summary = report.summary
    assert not summary.ok and summary.guest_on == "source", summary
    assert "dst device dev0" in summary.message, summary.message
    assert not any(report.checks.values()), report.checks
    assert report.checks["destination QEMU ended"] is None and report.violations == []
