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
    done = subprocess.run([str(ROOT / "scripts/libvirt-e2e")], capture_output=True, text=True, timeout=900, env=env)
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
    left = subprocess.run(["pgrep", "-f", f"libvirtd|virtlogd|{tmp_path}"], capture_output=True, text=True)
    running = [pid for pid in left.stdout.split() if _state(pid) not in ("Z", "X", None)]
    assert running == [], f"left running: {running}"


def _state(pid: str) -> str | None:
    """A process's state letter; None once it is gone.  Zombies wait for
    PID 1 here, which reaps them late: they run nothing."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
