"""One saving stream and one resuming stream of the reference device.

A :class:`Saver` lives while the device is in the saving group (v2
PRE_COPY, PRE_COPY_P2P, STOP_COPY; v1 SAVING).  Pre-copy (seed 000,
SAVING|RUNNING) sends every page once, then the pages the internal dirty
log marks; stop-copy (SAVING|!RUNNING) adds what is still dirty, the
registers, and the end marker, after which reads return nothing (uAPI: in
STOP_COPY end of stream is for good).  A :class:`Loader` applies a stream in
RESUMING and validates it when RESUMING is left.
"""

from __future__ import annotations

import json
from typing import Callable

from ..errors import StreamError
from ..vfio_user.uapi import PAGE_SIZE
from . import savestream
from .savestream import CHUNK
from .state import InternalState

#: Pages per PAGE chunk of the first pass (1 MiB: savestream.MAX_PAYLOAD).
RUN_PAGES = 256
#: What the register and end chunks add to the stream, at most.
REGS_ESTIMATE = 4096


class Saver:
    """The data a saving device streams out, produced on demand."""

    def __init__(self, state: InternalState, config: dict, precopy: bool):
        self.state = state
        self._pending = bytearray(savestream.header(config))
        self._next = 0
        self._chunks = 1
        self._final: Callable[[], dict] | None = None
        self.ended = False
        self.bytes_read = 0
        self.precopy = precopy
        if precopy:
            state.start_logging()

    def stop_copy(self, registers: Callable[[], dict]) -> None:
        """SAVING|!RUNNING: the state is frozen; what remains is the rest of
        the first pass, the dirty pages, ``registers()`` and the end."""
        self._final = registers

    @property
    def initial_bytes(self) -> int:
        """Pre-copy: bytes left of the first pass (PRECOPY_INFO initial_bytes)."""
        left = self.state.pages - self._next
        return len(self._pending) + left * PAGE_SIZE + -(-left // RUN_PAGES) * CHUNK.size

    @property
    def dirty_bytes(self) -> int:
        """Pre-copy: bytes of the pages dirtied after the first pass sent them
        (PRECOPY_INFO dirty_bytes); a page the first pass has yet to send is
        in initial_bytes only."""
        return self.state.dirty_below(self._next) * (PAGE_SIZE + CHUNK.size)

    @property
    def pending_bytes(self) -> int:
        """What is left to read: in stop-copy, to the end of the stream."""
        if self.ended:
            return len(self._pending)
        tail = REGS_ESTIMATE if self._final else 0
        return self.initial_bytes + self.dirty_bytes + tail

    def _produce(self) -> bool:
        state = self.state
        if self._next < state.pages:
            n = min(RUN_PAGES, state.pages - self._next)
            state.clear_dirty(self._next, n)
            data = memoryview(state.data)[self._next * PAGE_SIZE:(self._next + n) * PAGE_SIZE]
            self._pending += savestream.encode(b"PAGE", self._next, data)
            self._next += n
        elif state.dirty_pages:
            for page in state.take_dirty(RUN_PAGES):
                self._pending += savestream.encode(b"PAGE", page, state.page(page))
                self._chunks += 1
            return True
        elif self._final and not self.ended:
            regs = json.dumps(self._final(), sort_keys=True).encode()
            self._pending += savestream.encode(b"REGS", 0, regs)
            self._chunks += 1
            self._pending += savestream.encode(b"DONE", self._chunks, state.digest())
            self.ended = True
            state.stop_logging()
            return True
        else:
            return False
        self._chunks += 1
        return True

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; fewer only when no more is available now
        (pre-copy) or ever (stop-copy)."""
        while len(self._pending) < size and self._produce():
            pass
        out = bytes(self._pending[:size])
        del self._pending[:size]
        self.bytes_read += len(out)
        return out

    def close(self) -> None:
        self.state.stop_logging()


class Loader:
    """A RESUMING device's incoming stream, applied as it arrives."""

    def __init__(self, state: InternalState, config: dict):
        self.state = state
        self.reader = savestream.StreamReader(config)
        self.registers: dict | None = None
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        self.bytes_written += len(data)
        for chunk in self.reader.feed(data):
            if chunk.tag == b"PAGE":
                n, rem = divmod(len(chunk.payload), PAGE_SIZE)
                if rem or not n or chunk.arg + n > self.state.pages:
                    self.reader.error = f"page chunk {chunk.arg}+{n} outside the state"
                    raise StreamError(self.reader.error)
                self.state.data[chunk.arg * PAGE_SIZE:(chunk.arg + n) * PAGE_SIZE] = chunk.payload
            elif chunk.tag == b"REGS":
                try:
                    self.registers = json.loads(chunk.payload)
                except ValueError as err:
                    self.reader.error = f"unreadable registers: {err}"
                    raise StreamError(self.reader.error) from None

    def finish(self) -> dict:
        """Leaving RESUMING: the stream must be whole and reproduce the
        source's state exactly; return the registers to load."""
        done = self.reader.finish()
        if self.registers is None:
            raise StreamError("stream has no register chunk")
        if self.state.digest() != done.payload:
            raise StreamError("loaded state differs from the source's (digest mismatch)")
        return self.registers
