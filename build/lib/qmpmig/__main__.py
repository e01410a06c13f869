"""``python -m qmpmig``: the ``qmpmig`` command."""

import sys

from .tools.cli import main

sys.exit(main())
