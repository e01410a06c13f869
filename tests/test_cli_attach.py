"""``qmpmig migrate`` attached to QEMUs and devices it did not start, as a
user runs it, and interrupted with Ctrl-C mid-way: the source runs on."""

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest

from qmpmig.rig.processes import DeviceProcess
from qmpmig.controller.devices import RemoteDevice
from qmpmig.qemu.qmp import Qemu
from qmpmig.migration.states import MigState
from qmpmig.rig.vm import Vm

pytestmark = pytest.mark.qemu


@pytest.fixture
def setup(tmp_path, guest_image):
    src = Vm("src", "source", workdir=tmp_path).start()
    dst = Vm("dst", "destination", workdir=tmp_path).start()
    devices = [DeviceProcess(tmp_path / f"{side}.sock", "--state-size", "64M").start() for side in ("s", "d")]
    src.wait_heartbeat(1, 60)
    argv = [sys.executable, "-m", "qmpmig", "migrate", "--src-qmp", str(src.qmp_path),
            "--dst-qmp", str(dst.qmp_path), "--uri", f"unix:{tmp_path / 'mig.sock'}",
            "--src-ram", str(src.ram_path), "--dst-ram", str(dst.ram_path),
            "--device", f"{devices[0].socket},{devices[1].socket}", "--trace", str(tmp_path / "trace.jsonl")]
    yield src, dst, devices, argv, tmp_path
    for proc in devices:
        proc.close()
    src.close()
    dst.close()


def test_attach_mode_migrates_and_writes_a_trace_that_checks(setup):
    src, dst, devices, argv, tmp = setup
    done = subprocess.run(argv + ["--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] and result["trace_violations"] == [] and result["device_bytes"] > 64 << 20
    check = subprocess.run([sys.executable, "-m", "qmpmig", "trace", "check", str(tmp / "trace.jsonl")],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "FAIL" not in check.stdout
    dst.wait_heartbeat(src.last_heartbeat(), 30)


async def source_state(src, device_socket):
    qemu = Qemu("check")
    await qemu.connect(str(src.qmp_path))
    status = await qemu.query_status()
    await qemu.disconnect()
    dev = await RemoteDevice.open(str(device_socket))
    state = await dev.state()
    await dev.close()
    return status, state


def test_ctrl_c_mid_migration_leaves_the_source_running(setup):
    src, dst, devices, argv, tmp = setup
    proc = subprocess.Popen(argv + ["--threshold", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        trace = (tmp / "trace.jsonl").read_text() if (tmp / "trace.jsonl").exists() else ""
        if '"name": "precopy"' in trace:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "interrupted" in err
    records = [json.loads(line) for line in (tmp / "trace.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "phase" and records[-1]["name"] == "failed"
    assert any(r["kind"] == "result" and not r["ok"] and "interrupted" in r["message"] for r in records)
    # The controller let go; the source is as it was, and keeps going.
    status, state = asyncio.run(source_state(src, devices[0].socket))
    assert status.running and state is MigState.RUNNING
    beat = src.last_heartbeat()
    src.wait_heartbeat(beat + 1, 20)
