"""What a libvirt domain says about its qmpmig devices: a ``<metadata>``
element in qmpmig's own XML namespace (libvirt keeps one element per
namespace under ``<metadata>``; ``virsh metadata`` and
``virDomainSetMetadata`` read and write it by that URI)::

    <metadata>
      <qmpmig:vm xmlns:qmpmig="https://qmpmig.dev/xmlns/libvirt/1"
                 monitor="/run/qmpmig/libvirt/{name}.qmp" incoming="refuse">
        <qmpmig:device name="nic0" socket="/run/qmpmig/libvirt/{name}-nic0.sock"
                       command="qmpmig device --socket {socket} --state-size 16M"/>
        <qmpmig:host name="host-b">
          <qmpmig:device name="nic0" command="/opt/nic/bin/nic-vfu --sock {socket}"/>
        </qmpmig:host>
      </qmpmig:vm>
    </metadata>

- ``monitor``: the path of a second QMP monitor the domain gives QEMU
  (``<qemu:commandline>``: ``-chardev socket,id=qmpmig,path=...,server=on,wait=off
  -mon chardev=qmpmig,mode=control``); libvirt owns the first one.
- ``incoming``: what the hook does with an incoming migration that qmpmig
  does not drive: ``refuse`` (the default: a plain ``virsh migrate`` would
  leave the device state behind) or ``follow`` (admitted; the source
  host's daemon follows it, and where the manager's sequence leaves no
  window for a rule, which is libvirt's case, records the violation and
  cancels it before its switchover).
- each ``device``: its vfio-user socket and, optionally, the command that
  starts its process (the hook starts it at ``prepare`` and stops it at
  ``release``; without one the device is someone else's to run).
- a ``host`` element, by host name, overrides a device's ``socket`` or
  ``command`` on that host.
- ``migration``: set by ``qmpmig migrate --libvirt`` in the XML it gives
  the destination, the id of the migration it drives there.

``{name}`` and ``{uuid}`` stand for the domain's, ``{socket}`` (in a
command) for the device's socket.
"""

from __future__ import annotations

import socket as _socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ..errors import QmpmigError

NAMESPACE = "https://qmpmig.dev/xmlns/libvirt/1"
PREFIX = "qmpmig"
INCOMING = ("refuse", "follow")


class DomainError(QmpmigError):
    """A domain's qmpmig metadata that cannot be used."""


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    socket: str
    command: str | None


@dataclass(frozen=True)
class DomainSpec:
    """A domain's qmpmig devices, as they are on this host."""

    name: str
    uuid: str
    monitor: str
    incoming: str
    devices: tuple[DeviceSpec, ...]


def _q(tag: str) -> str:
    return f"{{{NAMESPACE}}}{tag}"


def _vm(domain_xml: str) -> tuple[ET.Element, ET.Element | None]:
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as err:
        raise DomainError(f"domain XML does not parse: {err}") from None
    return root, root.find(f"metadata/{_q('vm')}")


def migration_id(domain_xml: str) -> str | None:
    """The id of the qmpmig migration this XML was given for, if any."""
    vm = _vm(domain_xml)[1]
    return None if vm is None else vm.get("migration")


def parse(domain_xml: str, host: str | None = None) -> DomainSpec | None:
    """The qmpmig part of a domain's XML on ``host`` (this host's name by
    default); None when the domain has no qmpmig devices."""
    root, vm = _vm(domain_xml)
    if vm is None:
        return None
    name, uuid = root.findtext("name") or "", root.findtext("uuid") or ""
    host = host or _socket.gethostname()
    fill = {"name": name, "uuid": uuid}

    def expand(template: str | None, where: str, **extra: str) -> str | None:
        if template is None:
            return None
        try:
            return template.format(**fill, **extra)
        except (KeyError, IndexError, ValueError) as err:
            raise DomainError(f"{where}: {template!r}: unknown or bad placeholder {err}") from None

    incoming = vm.get("incoming", "refuse")
    if incoming not in INCOMING:
        raise DomainError(f"incoming={incoming!r}: expected one of {', '.join(INCOMING)}")
    monitor = expand(vm.get("monitor"), "monitor")
    if not monitor or not monitor.startswith("/"):
        raise DomainError("qmpmig:vm needs monitor=, the absolute path of a second QMP monitor")
    overrides = {}
    for here in vm.findall(_q("host")):
        if here.get("name") == host:
            overrides = {d.get("name"): d for d in here.findall(_q("device"))}
    devices, seen = [], set()
    for element in vm.findall(_q("device")):
        dev = element.get("name")
        if not dev or dev in seen:
            raise DomainError(f"qmpmig:device needs a name of its own (got {dev!r})")
        seen.add(dev)
        local = overrides.get(dev)
        pick = (lambda attr: local.get(attr, element.get(attr))) if local is not None else element.get
        sock = expand(pick("socket"), f"device {dev} socket")
        if not sock or not sock.startswith("/"):
            raise DomainError(f"device {dev}: socket= must be an absolute path")
        devices.append(DeviceSpec(dev, sock, expand(pick("command"), f"device {dev} command", socket=sock)))
    if not devices:
        raise DomainError("qmpmig:vm declares no qmpmig:device")
    return DomainSpec(name, uuid, monitor, incoming, tuple(devices))


#: libvirt's namespace for <qemu:commandline>, which carries the second monitor.
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"


def with_migration(domain_xml: str, migration: str) -> str:
    """The domain's XML for the destination of qmpmig migration
    ``migration``: its ``qmpmig:vm`` says the id, which the destination's
    hook checks with its daemon at ``migrate begin``."""
    root, vm = _vm(domain_xml)
    if vm is None:
        raise DomainError(f"domain {root.findtext('name')!r} has no qmpmig metadata: no qmpmig devices to migrate")
    vm.set("migration", migration)
    ET.register_namespace(PREFIX, NAMESPACE)
    ET.register_namespace("qemu", QEMU_NAMESPACE)
    return ET.tostring(root, encoding="unicode")
