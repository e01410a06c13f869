"""Data shipped inside the package: the JSON tables and schemas.

Read through :mod:`importlib.resources`, so an installed qmpmig (a wheel, a
libvirt hook's interpreter) finds them as well as a checkout does.
"""

from __future__ import annotations

import functools
import json
from importlib.resources import files


@functools.cache
def load_json(name: str) -> dict:
    """``qmpmig/schemas/<name>``, parsed."""
    return json.loads(files("qmpmig").joinpath("schemas", name).read_text())
