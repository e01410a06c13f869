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
import zlib
from typing import Callable

from ..bytequeue import ByteQueue
from ..errors import StreamError
from ..vfio_user import codec
from ..vfio_user.uapi import PAGE_SIZE
from . import savestream
from .savestream import CHUNK
from .state import BLOCK_PAGES, InternalState

#: Pages per PAGE chunk of the first pass: one block of the state's digest
#: (1 MiB: savestream.MAX_PAYLOAD), whose CRC the digest then reuses.
RUN_PAGES = BLOCK_PAGES
#: What the register and end chunks add to the stream, at most.
REGS_ESTIMATE = 4096


class Saver:
    """The data a saving device streams out, produced on demand.

    What is produced waits in ``_out`` (a ByteQueue) as pieces: chunk headers and page
    runs.  In stop-copy the state is frozen and a page run is a view of it,
    copied once, into the reply; in pre-copy the device may rewrite a page
    before the piece goes out, so the run is copied when produced (its CRC
    must match what is sent; the rewrite is in the dirty log)."""

    def __init__(self, state: InternalState, config: dict, precopy: bool):
        self.state = state
        self._out = ByteQueue()
        self._emit(savestream.header(config))
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

    def _emit(self, *pieces: bytes | memoryview) -> None:
        for piece in pieces:
            self._out.append(piece)

    def _chunk(self, tag: bytes, arg: int, payload: bytes | memoryview, payload_crc: int | None = None) -> None:
        self._emit(savestream.chunk_header(tag, arg, payload, payload_crc), payload)
        self._chunks += 1

    @property
    def initial_bytes(self) -> int:
        """Pre-copy: bytes left of the first pass (PRECOPY_INFO initial_bytes)."""
        left = self.state.pages - self._next
        return len(self._out) + left * PAGE_SIZE + -(-left // RUN_PAGES) * CHUNK.size

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
            return len(self._out)
        tail = REGS_ESTIMATE if self._final else 0
        return self.initial_bytes + self.dirty_bytes + tail

    def _page_chunk(self, first: int, count: int = 1) -> None:
        """A PAGE chunk of the pages as they are now (a copy in pre-copy,
        where they may change before they go out)."""
        run = self.state.pages_at(first, count)
        if not self._final:
            run = run.tobytes()
        crc = zlib.crc32(run)
        self.state.known_crc(first, count, crc)
        self._chunk(b"PAGE", first, run, crc)

    def _produce(self) -> bool:
        state = self.state
        if self._next < state.pages:
            n = min(RUN_PAGES, state.pages - self._next)
            state.clear_dirty(self._next, n)
            self._page_chunk(self._next, n)
            self._next += n
        elif state.dirty_pages:
            for page in state.take_dirty(RUN_PAGES):
                self._page_chunk(page)
        elif self._final and not self.ended:
            self._chunk(b"REGS", 0, json.dumps(self._final(), sort_keys=True).encode())
            self._chunk(b"DONE", self._chunks, state.digest())
            self.ended = True
            state.stop_logging()
        else:
            return False
        return True

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; fewer only when no more is available now
        (pre-copy) or ever (stop-copy)."""
        while len(self._out) < size and self._produce():
            pass
        out = b"".join(self._out.take_parts(min(size, len(self._out))))
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
                n, rem = divmod(len(chunk), PAGE_SIZE)
                if rem or not n or chunk.arg + n > self.state.pages:
                    self.reader.error = f"page chunk {chunk.arg}+{n} outside the state"
                    raise StreamError(self.reader.error)
                self.state.store(chunk.arg, chunk.parts, chunk.payload_crc)
            elif chunk.tag == b"REGS":
                try:
                    self.registers = savestream.read_json(chunk, "registers")
                except StreamError as err:
                    self.reader.error = str(err)
                    raise

    def finish(self) -> dict:
        """Leaving RESUMING: the stream must be whole and reproduce the
        source's state exactly; return the registers to load."""
        done = self.reader.finish()
        if self.registers is None:
            raise StreamError("stream has no register chunk")
        if self.state.digest() != done.payload:
            raise StreamError("loaded state differs from the source's (digest mismatch)")
        return self.registers


class NullSaver:
    """Bench mode (``--null-stream``): a stop-copy stream of ``size`` bytes
    served from one constant buffer, no copy and no check; nothing in
    pre-copy.  It measures the path the data takes, not the device."""

    BUFFER = memoryview(bytes(range(256)) * (codec.QMPMIG_MAX_DATA_XFER // 256))

    def __init__(self, size: int):
        self.left = size
        self.precopy = False
        self.ended = False
        self._final = False
        self.bytes_read = 0
        self.initial_bytes = self.dirty_bytes = 0

    def stop_copy(self, registers: Callable[[], dict]) -> None:
        self._final = True

    @property
    def pending_bytes(self) -> int:
        return self.left if self._final else 0

    def read(self, size: int) -> memoryview:
        n = min(size, self.left, len(self.BUFFER)) if self._final else 0
        self.left -= n
        self.ended = self._final and not self.left
        self.bytes_read += n
        return self.BUFFER[:n]

    def close(self) -> None:
        pass


class NullLoader:
    """Bench mode: a resume that counts what it is given and loads nothing;
    leaving RESUMING keeps the device's own registers."""

    def __init__(self, registers: Callable[[], dict]):
        self.registers = registers
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        self.bytes_written += len(data)

    def finish(self) -> dict:
        return self.registers()
