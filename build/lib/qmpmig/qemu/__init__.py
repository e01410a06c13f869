"""QEMU as the controller meets it: one QEMU over QMP (:mod:`.qmp`) and its
guest RAM as a shared file (:mod:`.guestmem`)."""
