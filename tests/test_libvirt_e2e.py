"""qmpmig under real libvirt: scripts/libvirt-e2e sets up two libvirtd
"hosts" in namespaces on this machine, runs its cases and tears them down;
this test holds it to its JSON result and to leaving nothing running."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(os.geteuid() != 0, reason="two libvirtd in namespaces need root")]


def test_libvirt_e2e_refuses_stops_a_followed_one_migrates_and_leaves_nothing_running(guest_image, tmp_path):
    env = {**os.environ, "LV": str(tmp_path / "lv"), "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    cases = [arg for case in ("refused", "followed", "across", "libvirt") for arg in ("--case", case)]
    done = subprocess.run([str(ROOT / "scripts/libvirt-e2e"), *cases], capture_output=True, text=True, timeout=900,
                          env=env)
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["ok"], json.dumps(result, indent=1) + done.stderr[-3000:]
    refused = result["cases"]["refused"]
    assert "qmpmig migrate --libvirt" in refused["message"] and refused["on_b"] == ""
    assert refused["heartbeats"][1] > refused["heartbeats"][0] and refused["device"] == ["RUNNING"]
    across = result["cases"]["across"]
    assert across["migrate"]["ok"] and across["hashes_equal"] and across["heartbeat_at_b"], across
    assert across["rogue_refused"] and across["b_after_rogue"] == ["running"], across
    followed = result["cases"]["followed"]
    assert followed["migrate_exit"] != 0 and followed["stopped"]["stopped"], followed
    assert [line.split()[1] for line in followed["trace_check"]] == ["managed"], followed
    assert followed["on_a"] == "running" and followed["on_b"] == "" and followed["device"] == [["RUNNING", 0]]
    moved = result["cases"]["libvirt"]
    assert moved["rogue"]["ok"], moved["rogue"]
    assert moved["migrate"]["ok"] and moved["migrate"]["trace_violations"] == [] and moved["hashes_equal"], moved
    assert moved["heartbeat_at_b"] and moved["on_a"] == "" and moved["on_b"] == "running", moved
    assert "dst virDomainResume" in moved["libvirt_calls"] and "src virDomainSuspend" in moved["libvirt_calls"]
    early = moved["early_release"]
    assert early["trace_violations"] and all(v.startswith("end-of-stream") for v in early["trace_violations"])
    assert result["traces"] == [followed["trace"], across["trace"], moved["trace"], early["trace"]]
    assert _left_running(tmp_path) == []


def _state(pid: str) -> str | None:
    """A process's state letter; None once it is gone.  Zombies wait for
    PID 1 here, which reaps them late: they run nothing."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def test_the_link_cut_in_each_phase_leaves_the_guest_on_one_side_and_nothing_behind(guest_image, tmp_path):
    """Issue 14's cut link: A's end of the veth pair down in each phase of a
    cross-host migration, and once every device at B loaded its state; B's
    end down in three of them (scripts/libvirt-e2e, case cut).  Before every
    destination device loaded its state the guest runs on at A with its
    device RUNNING, the command fails within CUT_RECOVERY of the cut (a
    guest paused by the migration runs again within --max-pause), B's
    daemon ends its side by itself (its QEMU quit, its device reset, the
    expectation dropped) though the link stays down, and what reaches B once
    the link is back is refused.  Once every device at B loaded, but before
    A started the guest there, the guest goes back to A all the same (B never
    ran it), and B keeps its copy paused with its devices loaded, neither
    destroyed nor started, for the operator to discard.  A blip (the link
    down one second, case blip) in pre-copy, stop-copy or the switchover
    is ridden out: the migration completes."""
    env = {**os.environ, "LV": str(tmp_path / "lv"), "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([str(ROOT / "scripts/libvirt-e2e"), "--case", "cut", "--case", "blip"],
                          capture_output=True, text=True, timeout=1200, env=env)
    result = json.loads(done.stdout)
    cells = result["cases"]["cut"]["cells"]
    assert done.returncode == 0 and result["ok"], json.dumps(result, indent=1) + done.stderr[-3000:]
    assert list(cells) == ["setup", "precopy", "grace", "stop-copy", "switchover", "resume", "resume+loaded",
                           "precopy@b", "switchover@b", "resume+loaded@b"]
    for phase, cell in cells.items():
        assert cell["exit"] != 0 and not cell["trace_result"]["ok"] and cell["trace_check"], (phase, cell)
        assert cell["a_migrations"] == cell["b_migrations"] == cell["b_incoming"] == [], (phase, cell)
        assert cell["stale_refused"] and not cell["left_behind"], (phase, cell)
        if cell["guest"] == "source":
            assert cell["devices_a"] == [["g0", "running", ["RUNNING"]]] and cell["b_over_s"] <= 15, (phase, cell)
            # Switchover too: QEMU 7.2 sends its last RAM holding its big lock,
            # frozen on the dead link with its monitor, until qmpmig shuts the
            # stream down from outside (qmpmig.qemu.channel).
            assert not cell["frozen"] and cell["guest_on"] == "source" and cell["recovered_s"] <= 10, (phase, cell)
            assert cell["paused_s"] is None or cell["paused_s"] <= 5.0, (phase, cell)
            if phase.partition("@")[0] == "resume+loaded":    # B had loaded, never started: its copy kept paused for the operator
                assert "goes back to the source" in cell["message"], (phase, cell)
                assert "every device here had loaded" in cell["b_peer_lost"][0]["outcome"], (phase, cell)
                assert cell["dst_qemu_exit"] is None and cell["devices_b"][0][2] == ["STOP"], (phase, cell)
            elif cell["devices_b"]:         # never asked to listen: kept waiting, holding nothing of the guest
                assert cell["devices_b"] == [[cell["dst"], "inmigrate", ["RUNNING"]]], (phase, cell)
                assert "never asked to listen" in cell["b_peer_lost"][0]["outcome"], (phase, cell)
            else:
                assert cell["dst_qemu_exit"] is not None, (phase, cell)
        else:
            raise AssertionError(f"the guest left the source: {phase} {cell}")
    blips = result["cases"]["blip"]["cells"]
    assert list(blips) == ["precopy", "stop-copy", "switchover"], blips
    for phase, cell in blips.items():
        assert cell["completed"] and cell["exit"] == 0 and cell["guest_on"] == "destination", (phase, cell)
        assert cell["hashes_equal"] and cell["trace_check"] and cell["heartbeat_at_b"], (phase, cell)
    assert _left_running(tmp_path) == []


def _left_running(tmp_path: Path) -> list[str]:
    left = subprocess.run(["pgrep", "-f", f"libvirtd|virtlogd|{tmp_path}"], capture_output=True, text=True)
    return [pid for pid in left.stdout.split() if _state(pid) not in ("Z", "X", None)]
