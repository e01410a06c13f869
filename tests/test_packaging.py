"""qmpmig as a user installs it: a wheel built from this tree, installed
(not editable) in a fresh virtual environment, run from a directory where
the checkout cannot be imported.  The schemas and tables travel inside the
package; the commands work."""

import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

from test_trace import good_flow, trace

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the wheel of this tree and its dependencies."""
    work = tmp_path_factory.mktemp("install")
    wheels = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
                   check=True, timeout=300)
    wheel, = wheels.glob("qmpmig-*.whl")
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # Away from the checkout: pip would take its qmpmig.egg-info for an install.
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
                   check=True, timeout=600, cwd=work, env=clean_env())
    return env_dir, work


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def run(env_dir: Path, cwd: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = clean_env()
    env["PATH"] = f"{env_dir / 'bin'}:{env['PATH']}"
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_installed_package_is_not_the_checkout(installed):
    env_dir, work = installed
    done = run(env_dir, work, "python", "-c", "import qmpmig; print(qmpmig.__file__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(env_dir)), done.stdout


def test_installed_lifecycle_table(installed):
    env_dir, work = installed
    done = run(env_dir, work, "python", "-c",
               "from qmpmig.migration import lifecycle; "
               "print(lifecycle.target('source', 'running', 'active', 7).name, len(lifecycle.table()['runstates']))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["PRE_COPY", "16"]


def test_installed_trace_check(installed):
    env_dir, work = installed
    good, bad = work / "good.jsonl", work / "bad.jsonl"
    records = trace(*good_flow())
    good.write_text("".join(json.dumps(r) + "\n" for r in records))
    bad.write_text("".join(json.dumps(r) + "\n" for r in records if r.get("kind") != "dirty_copy"))
    done = run(env_dir, work, "qmpmig", "trace", "check", str(good))
    assert done.returncode == 0 and "FAIL" not in done.stdout, done.stdout + done.stderr
    done = run(env_dir, work, "qmpmig", "trace", "check", str(bad))
    assert done.returncode == 1 and "FAIL  cont-after-copy" in done.stdout, done.stdout + done.stderr


def test_installed_check_against_installed_device(installed):
    env_dir, work = installed
    sock = work / "device.sock"
    device = subprocess.Popen([str(env_dir / "bin" / "qmpmig-device"), "--socket", str(sock),
                               "--state-size", "1M", "--dma-rate", "2000"], cwd=work, env=clean_env())
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert device.poll() is None and time.monotonic() < deadline, "qmpmig-device did not start"
            time.sleep(0.05)
        done = run(env_dir, work, "qmpmig", "check", "--socket", str(sock), "--json", timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["passed"] and report["device"]["protocol"] == "v2"
        assert {r["status"] for r in report["results"]} <= {"PASS", "SKIP"}
    finally:
        device.terminate()
        device.wait(10)
