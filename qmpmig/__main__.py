"""``python -m qmpmig``: the ``qmpmig`` command.  ``qmpmig libvirt`` (what
libvirt's hook runs while libvirt waits) skips the rest of the tool."""

import sys

if sys.argv[1:2] == ["libvirt"]:
    from .libvirt.cli import main as libvirt_main
    sys.exit(libvirt_main(sys.argv[2:]))

from .tools.cli import main  # noqa: E402

sys.exit(main())
