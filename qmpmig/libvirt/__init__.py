"""qmpmig under libvirt: the domain metadata that declares a domain's
devices (:mod:`.domain`), the hook that runs them with the domain and keeps
plain migrations from leaving their state behind (:mod:`.hook`), and the
hand-over of a domain's devices to the host's daemon (:mod:`.handover`)."""
