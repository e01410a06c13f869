"""``qmpmig migrate`` attached to QEMUs and devices it did not start, as a
user runs it: the command hands both VMs and the migration to the host's
daemon (starting one), so the command exiting, interrupted or killed in any
phase, never touches a device or the migration in flight."""

import json
import signal
import subprocess
import sys
import time

import pytest

from qmpmig.rig.processes import DeviceProcess
from qmpmig.rig.vm import Vm

from test_daemon import stop_daemon

pytestmark = pytest.mark.qemu


@pytest.fixture
def setup(tmp_path, guest_image):
    src = Vm("src", "source", workdir=tmp_path).start()
    dst = Vm("dst", "destination", workdir=tmp_path).start()
    devices = [DeviceProcess(tmp_path / f"{side}.sock", "--state-size", "64M").start() for side in ("s", "d")]
    run_dir = tmp_path / "run"
    src.wait_heartbeat(1, 60)
    argv = [sys.executable, "-m", "qmpmig", "migrate", "--src-qmp", str(src.qmp_path),
            "--dst-qmp", str(dst.qmp_path), "--uri", f"unix:{tmp_path / 'mig.sock'}",
            "--src-ram", str(src.ram_path), "--dst-ram", str(dst.ram_path),
            "--device", f"{devices[0].socket},{devices[1].socket}", "--trace", str(tmp_path / "trace.jsonl"),
            "--run-dir", str(run_dir)]
    yield src, dst, devices, argv, tmp_path
    stop_daemon(run_dir)
    for proc in devices:
        proc.close()
    src.close()
    dst.close()


def status(tmp) -> dict:
    done = subprocess.run([sys.executable, "-m", "qmpmig", "status", "--json", "--run-dir", str(tmp / "run")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_attach_mode_migrates_and_writes_a_trace_that_checks(setup):
    src, dst, devices, argv, tmp = setup
    done = subprocess.run(argv + ["--json", "--verify-ram"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] and result["trace_violations"] == [] and result["device_bytes"] > 64 << 20
    check = subprocess.run([sys.executable, "-m", "qmpmig", "trace", "check", str(tmp / "trace.jsonl")],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "FAIL" not in check.stdout
    verified = [r for r in trace_records(tmp) if r["kind"] == "ram_verify"]
    assert verified and verified[0]["differing"] == 0 and verified[0]["unit"] == 4096
    dst.wait_heartbeat(src.last_heartbeat(), 30)
    # The command is gone; the daemon keeps the destination's device.
    vms = status(tmp)["vms"]
    assert [vm["name"] for vm in vms] == [str(dst.qmp_path)]
    assert vms[0]["devices"][0]["state"] == "RUNNING" and vms[0]["devices"][0]["client_losses"] == 0


def trace_records(tmp) -> list[dict]:
    path = tmp / "trace.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for_phase(tmp, phase: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["kind"] == "phase" and r["name"] == phase for r in trace_records(tmp)):
        assert time.monotonic() < deadline, f"no {phase} phase within {timeout:.0f} s"
        time.sleep(0.005)


def migration_ended(tmp, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while not (results := [r for r in trace_records(tmp) if r["kind"] == "result"]):
        assert time.monotonic() < deadline, f"the migration did not end within {timeout:.0f} s"
        time.sleep(0.1)
    return results[-1]


@pytest.mark.parametrize("phase,sig", [(p, signal.SIGKILL) for p in
                                       ("setup", "precopy", "grace", "stop-copy", "switchover", "resume")]
                         + [("precopy", signal.SIGINT)], ids=lambda x: getattr(x, "name", x))
def test_the_command_killed_in_any_phase_leaves_the_migration_going(setup, phase, sig, fault_cell):
    src, dst, devices, argv, tmp = setup
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_phase(tmp, phase)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0 and "migration completed" in out:
        pytest.skip(f"the migration was through before the {sig.name} landed in {phase}")
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), out + err
    result = migration_ended(tmp)
    fault_cell.outcome(f"the CLI {sig.name}", phase, "destination", 0, result["message"])
    assert result["ok"], result
    dst.wait_heartbeat(src.last_heartbeat(), 30)
    vms = status(tmp)["vms"]
    assert [vm["name"] for vm in vms] == [str(dst.qmp_path)] and vms[0]["runstate"] == "running"
    assert vms[0]["devices"][0]["state"] == "RUNNING" and vms[0]["devices"][0]["client_losses"] == 0
