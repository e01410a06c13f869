"""The libvirt hook and the domain metadata, run as libvirt runs the hook
(a process, the domain XML on stdin), on real device processes, a real
daemon and a real QEMU; libvirt itself is in scripts/libvirt-e2e."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmpmig.daemon import client
from qmpmig.libvirt import domain
from qmpmig.libvirt.cli import install_hook
from qmpmig.qemu.qmp import Qemu
from qmpmig.rig.processes import listening
from qmpmig.rig.vm import Vm

from test_daemon import stop_daemon

NS = domain.NAMESPACE


def domain_xml(tmp: Path, name: str = "guest1", devices: str | None = None, vm_attrs: str = "",
               monitor: str | None = None) -> str:
    devices = devices if devices is not None else (
        f'<qmpmig:device name="dev0" socket="{tmp}/{{name}}-dev0.sock" '
        f'command="{sys.executable} -m qmpmig device --socket {{socket}} --state-size 1M"/>')
    monitor = monitor or f"{tmp}/{{name}}.qmp"
    return (f"<domain type='qemu'><name>{name}</name><uuid>0b8a3c5e-8b1e-4d0c-9d5e-1f2a3b4c5d6e</uuid>"
            f"<metadata><qmpmig:vm xmlns:qmpmig='{NS}' monitor='{monitor}' {vm_attrs}>{devices}"
            f"</qmpmig:vm></metadata></domain>")


def hook(run_dir: Path, xml: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qmpmig", "libvirt", "hook", "--run-dir", str(run_dir), *argv],
                          input=xml, capture_output=True, text=True, timeout=60)


def wait_for(predicate, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def test_metadata_gives_this_hosts_devices_with_placeholders_filled(tmp_path):
    xml = domain_xml(tmp_path, devices=(
        '<qmpmig:device name="a" socket="/s/{name}-a.sock" command="dev --sock {socket} --id {uuid}"/>'
        '<qmpmig:device name="b" socket="/s/b.sock"/>'
        '<qmpmig:host name="other"><qmpmig:device name="a" command="other-dev {socket}"/></qmpmig:host>'
        '<qmpmig:host name="here"><qmpmig:device name="b" socket="/t/b.sock" command="b-dev {socket}"/>'
        '</qmpmig:host>'))
    spec = domain.parse(xml, host="here")
    assert spec.name == "guest1" and spec.monitor == f"{tmp_path}/guest1.qmp" and spec.incoming == "refuse"
    assert spec.devices == (
        domain.DeviceSpec("a", "/s/guest1-a.sock", "dev --sock /s/guest1-a.sock --id 0b8a3c5e-8b1e-4d0c-9d5e-1f2a3b4c5d6e"),
        domain.DeviceSpec("b", "/t/b.sock", "b-dev /t/b.sock"))
    assert domain.parse(xml, host="other").devices[0].command == "other-dev /s/guest1-a.sock"
    assert domain.parse("<domain><name>plain</name></domain>") is None
    assert domain.migration_id(domain_xml(tmp_path, vm_attrs="migration='m-7'")) == "m-7"


@pytest.mark.parametrize("devices,attrs,monitor,error", [
    ('<qmpmig:device name="a" socket="/s"/><qmpmig:device name="a" socket="/t"/>', "", None, "a name of its own"),
    ('<qmpmig:device name="a" socket="relative.sock"/>', "", None, "absolute path"),
    ('<qmpmig:device name="a" socket="/s/{nope}"/>', "", None, "placeholder"),
    ("", "", None, "declares no qmpmig:device"),
    ('<qmpmig:device name="a" socket="/s"/>', "incoming='maybe'", None, "incoming="),
    ('<qmpmig:device name="a" socket="/s"/>', "", "qmp.sock", "monitor="),
])
def test_metadata_that_cannot_be_used_is_refused_with_the_reason(tmp_path, devices, attrs, monitor, error):
    with pytest.raises(domain.DomainError, match=error):
        domain.parse(domain_xml(tmp_path, devices=devices, vm_attrs=attrs, monitor=monitor))


def test_prepare_starts_the_declared_devices_and_release_stops_them(tmp_path):
    run_dir, xml = tmp_path / "run", domain_xml(tmp_path)
    sock = tmp_path / "guest1-dev0.sock"
    started = time.monotonic()
    done = hook(run_dir, xml, "guest1", "prepare", "begin", "-")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 5, "the hook must not keep libvirt waiting"
    wait_for(lambda: listening(sock), what="the device listening")
    pids = [p["pid"] for p in __import__("json").loads((run_dir / "libvirt/guest1/devices.json").read_text())]
    assert pids and all(Path(f"/proc/{pid}").exists() for pid in pids)
    done = hook(run_dir, xml, "guest1", "release", "end", "-")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), what="the device stopped")
    assert not sock.exists()


def test_a_release_stops_only_the_processes_of_its_own_start(tmp_path):
    """The domain started again (or migrated back) right after a release:
    the release's let-go, however late, stops the old processes only."""
    run_dir, xml = tmp_path / "run", domain_xml(tmp_path)
    sock = tmp_path / "guest1-dev0.sock"
    record = run_dir / "libvirt/guest1/devices.json"
    assert hook(run_dir, xml, "guest1", "prepare", "begin", "-").returncode == 0
    wait_for(lambda: listening(sock), what="the first device listening")
    old = [p["pid"] for p in __import__("json").loads(record.read_text())]
    assert hook(run_dir, xml, "guest1", "release", "end", "-").returncode == 0
    assert hook(run_dir, xml, "guest1", "prepare", "begin", "-").returncode == 0
    new = [p["pid"] for p in __import__("json").loads(record.read_text())]
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in old), what="the old device stopped")
    time.sleep(1)
    assert all(Path(f"/proc/{pid}").exists() for pid in new), "the new start's device was stopped"
    assert hook(run_dir, xml, "guest1", "release", "end", "-").returncode == 0
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in new), what="the new device stopped")


def test_a_device_command_that_cannot_start_fails_the_domain_start(tmp_path):
    xml = domain_xml(tmp_path, devices='<qmpmig:device name="d" socket="/tmp/x.sock" command="/nonexistent/dev"/>')
    done = hook(tmp_path / "run", xml, "guest1", "prepare", "begin", "-")
    assert done.returncode == 1 and "'/nonexistent/dev' is not an executable" in done.stderr


def test_a_migration_qmpmig_does_not_drive_is_refused_naming_the_way_to_do_it(tmp_path):
    run_dir = tmp_path / "run"
    done = hook(run_dir, domain_xml(tmp_path), "guest1", "migrate", "begin", "-")
    assert done.returncode == 1
    assert "qmpmig migrate --libvirt guest1 --to" in done.stderr and "dev0" in done.stderr
    assert done.stdout == "", "stdout is the XML libvirt takes: empty means unchanged"
    follow = hook(run_dir, domain_xml(tmp_path, vm_attrs="incoming='follow'"), "guest1", "migrate", "begin", "-")
    assert follow.returncode == 0, "the source's daemon follows it: admitted"
    plain = hook(run_dir, "<domain><name>plain</name></domain>", "plain", "migrate", "begin", "-")
    assert plain.returncode == 0 and plain.stderr == ""


def test_a_migration_announced_to_the_daemon_is_let_in_once(tmp_path):
    run_dir = tmp_path / "run"
    xml = domain_xml(tmp_path, vm_attrs="migration='m-42'")
    try:
        asyncio.run(client.ensure_daemon(run_dir))
        unannounced = hook(run_dir, xml, "guest1", "migrate", "begin", "-")
        assert unannounced.returncode == 1 and "was not announced" in unannounced.stderr
        asyncio.run(client.call(run_dir, "expect", domain="guest1", migration="m-42"))
        assert hook(run_dir, xml, "guest1", "migrate", "begin", "-").returncode == 0
        assert hook(run_dir, xml, "guest1", "migrate", "begin", "-").returncode == 1, "an announcement is used up"
    finally:
        stop_daemon(run_dir)


def test_the_destination_xml_carries_the_migration_id_and_keeps_the_rest(tmp_path):
    """What qmpmig migrate --libvirt gives the destination: the domain's XML
    with its migration id, every other element and namespace as it was."""
    xml = domain_xml(tmp_path).replace(
        "</domain>", f"<qemu:commandline xmlns:qemu='{domain.QEMU_NAMESPACE}'><qemu:arg value='-S'/>"
                     "</qemu:commandline></domain>")
    moved = domain.with_migration(xml, "m7-1")
    assert domain.migration_id(moved) == "m7-1"
    assert domain.parse(moved) == domain.parse(xml)
    assert f'xmlns:qemu="{domain.QEMU_NAMESPACE}"' in moved and "<qemu:arg value=\"-S\"" in moved
    with pytest.raises(domain.DomainError, match="no qmpmig metadata"):
        domain.with_migration("<domain><name>plain</name></domain>", "m7-1")


def test_the_installed_hook_is_what_libvirt_runs(tmp_path):
    path = install_hook(tmp_path / "qemu.d", tmp_path / "run")
    assert os.access(path, os.X_OK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([str(path), "guest1", "migrate", "begin", "-"], input=domain_xml(tmp_path),
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1 and "qmpmig migrate --libvirt" in done.stderr


@pytest.mark.qemu
def test_started_hands_the_domain_to_the_daemon_which_finds_its_guest_ram(tmp_path, guest_image):
    """The hook's hand-over, on a real QEMU: the daemon attaches the domain
    through the monitor the metadata names and maps the RAM file QEMU's
    memory backend names (nobody told it the path)."""
    run_dir = tmp_path / "run"
    with Vm("guest1", "source", workdir=tmp_path) as vm:
        vm.start()
        assert asyncio.run(_ram_backing(vm.qmp_path)) == str(vm.ram_path)
        xml = domain_xml(tmp_path, monitor=str(vm.qmp_path))
        try:
            assert hook(run_dir, xml, "guest1", "prepare", "begin", "-").returncode == 0
            assert hook(run_dir, xml, "guest1", "started", "begin", "-").returncode == 0
            wait_for(lambda: _attached(run_dir), 60, "the daemon attaching guest1")
            (vm_status,) = asyncio.run(client.call(run_dir, "status"))["vms"]
            assert vm_status["name"] == "guest1" and vm_status["devices"][0]["state"] == "RUNNING"
            assert hook(run_dir, xml, "guest1", "release", "end", "-").returncode == 0
            wait_for(lambda: not _attached(run_dir), 30, "the daemon letting go")
            wait_for(lambda: not (tmp_path / "guest1-dev0.sock").exists(), 10, "the device stopping")
        finally:
            stop_daemon(run_dir)


async def _ram_backing(qmp: Path) -> str:
    qemu = Qemu("probe")
    await qemu.connect(str(qmp))
    try:
        return await qemu.ram_backing()
    finally:
        await qemu.disconnect()


def _attached(run_dir: Path) -> bool:
    try:
        return bool(asyncio.run(client.call(run_dir, "status"))["vms"])
    except Exception:
        return False
