"""The devices' owner: ``qmpmig daemon``, one per host.

A VFIO device is reset when its user goes away, so its user must live as
long as the VM, as QEMU does for in-process devices.  The daemon is that
user: the vfio-user client of every device of every VM handed to it
(:mod:`.owner`), from attach to the VM's end; the ``qmpmig`` command talks
to it over a control socket (:mod:`.control`, :mod:`.client`), and a
migration is one request to it.
"""
