"""The controller: a live migration of a QEMU guest with its vfio-user
devices, in the order seed 000's reference flows demand.

One module per piece, along the path of a migration:

- :mod:`.devices`: a device as the controller drives it, v1 or v2;
- :mod:`.side`: one VM, its QEMU followed, its RAM mapped into its devices;
- :mod:`.walk`: devices through the FSM, grace states as barriers;
- :mod:`.pump`: device data and DMA-dirty pages, source to destination;
- :mod:`.precopy`: the switchover hold, pre-copy, the grace state, the vCPU stop;
- :mod:`.flows`: the save and resume flows, top to bottom;
- :mod:`.recovery`: the source runs on after any failure;
- :mod:`.core`: the controller, migrations as requests;
- :mod:`.trace`: the JSON-lines trace it writes.
"""

from .devices import RemoteDevice
from .core import DEBUG, Controller, Options, Summary
from .pump import Pair
from .side import Side
from .trace import Trace

__all__ = ["DEBUG", "Controller", "Options", "Pair", "RemoteDevice", "Side", "Summary", "Trace"]
