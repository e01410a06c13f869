"""The spec as tables: device states with the uAPI's numbers
(:mod:`.states`), the FSM and seed 000's v1 actions (:mod:`.fsm`), and what
QEMU's (run state, migration status) asks of a device (:mod:`.lifecycle`).
No I/O here."""
