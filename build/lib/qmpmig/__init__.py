"""qmpmig: live migration of QEMU guests with devices outside QEMU."""

__version__ = "0.1.0"
