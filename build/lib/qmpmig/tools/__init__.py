"""qmpmig's tools: the conformance check, the trace checker and the command line."""
