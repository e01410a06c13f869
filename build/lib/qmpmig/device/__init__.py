"""qmpmig's reference vfio-user device (``qmpmig-device``)."""
