"""The reference device's internal state, and its dirty log.

Seed 000: in SAVING|RUNNING (PRE_COPY) the device logs changes to its
internal state so that pre-copy can send the state once and then only what
changed.  The state here is a byte array of whole pages that the device's
own activity rewrites while it RUNS, at a configurable rate, from a
deterministic generator; the log is one flag per page.
"""

from __future__ import annotations

import array
import hashlib
import random
import zlib
from collections.abc import Sequence

from ..vfio_user.uapi import PAGE_SIZE


#: Pages per block of the state's digest (a MiB), each block's CRC-32
#: kept while the block is unchanged.
BLOCK_PAGES = 256


class InternalState:
    """``size`` bytes of device-internal state, in pages, with a dirty log."""

    def __init__(self, size: int, seed: int = 0):
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"state size must be a positive multiple of {PAGE_SIZE}")
        self.size = size
        self.pages = size // PAGE_SIZE
        self.data = bytearray(size)
        self.logging = False
        self._dirty = bytearray(self.pages)
        self._ndirty = 0
        self._rng = random.Random(seed)
        self.generation = 0
        #: Each block's CRC-32, None until known or once the block changed.
        self._crcs: list[int | None] = [None] * -(-self.pages // BLOCK_PAGES)

    def mutate(self, npages: int) -> None:
        """The device at work: rewrite ``npages`` pseudo-random pages."""
        for _ in range(npages):
            page = self._rng.randrange(self.pages)
            self.generation += 1
            off = page * PAGE_SIZE
            stamp = self.generation.to_bytes(8, "little") + page.to_bytes(8, "little")
            self.data[off:off + 16] = stamp
            self.data[off + 16:off + 48] = hashlib.blake2b(stamp, digest_size=32).digest()
            self._crcs[page // BLOCK_PAGES] = None
            self.mark(page)

    def mark(self, page: int) -> None:
        if self.logging and not self._dirty[page]:
            self._dirty[page] = 1
            self._ndirty += 1

    def start_logging(self) -> None:
        """SAVING|RUNNING: clear the log and start it."""
        self._dirty = bytearray(self.pages)
        self._ndirty = 0
        self.logging = True

    def stop_logging(self) -> None:
        self.logging = False

    @property
    def dirty_pages(self) -> int:
        return self._ndirty

    def dirty_below(self, page: int) -> int:
        """Dirty pages numbered below ``page``."""
        return self._dirty.count(1, 0, page)

    def take_dirty(self, limit: int) -> list[int]:
        """Up to ``limit`` dirty pages, their flags cleared."""
        taken = []
        page = self._dirty.find(1)
        while page >= 0 and len(taken) < limit:
            self._dirty[page] = 0
            taken.append(page)
            page = self._dirty.find(1, page + 1)
        self._ndirty -= len(taken)
        return taken

    def clear_dirty(self, first: int, count: int = 1) -> None:
        """Pages [first, first + count) clean again."""
        self._ndirty -= self._dirty.count(1, first, first + count)
        self._dirty[first:first + count] = bytes(count)

    def pages_at(self, first: int, count: int) -> memoryview:
        """Pages [first, first + count), a view of the state."""
        return memoryview(self.data)[first * PAGE_SIZE:(first + count) * PAGE_SIZE]

    def block_pages(self, block: int) -> int:
        return min(BLOCK_PAGES, self.pages - block * BLOCK_PAGES)

    def known_crc(self, first: int, count: int, crc: int) -> None:
        """Pages [first, first + count) have CRC-32 ``crc`` now: where that is
        one whole block, its digest entry is known without reading it again."""
        block, rem = divmod(first, BLOCK_PAGES)
        if not rem and count == self.block_pages(block):
            self._crcs[block] = crc

    def store(self, first: int, parts: Sequence[bytes | memoryview], crc: int) -> None:
        """Write whole pages from ``first`` on, given in ``parts`` whose
        CRC-32 together is ``crc``."""
        at = first * PAGE_SIZE
        for part in parts:
            self.data[at:at + len(part)] = part
            at += len(part)
        count = at // PAGE_SIZE - first
        for block in range(first // BLOCK_PAGES, (first + count - 1) // BLOCK_PAGES + 1):
            self._crcs[block] = None
        self.known_crc(first, count, crc)

    def rng_state(self) -> list:
        return [self.generation, list(self._rng.getstate()[1]), self._rng.getstate()[2]]

    def set_rng_state(self, saved: list) -> None:
        """What :meth:`rng_state` gave; ValueError or TypeError for anything
        else (a resume stream is the client's to write: seed 003)."""
        if type(saved[0]) is not int or not 0 <= saved[0] < 1 << 63:
            raise ValueError(f"generation {saved[0]!r} is not a u63")
        self.generation = saved[0]
        self._rng.setstate((3, tuple(saved[1]), saved[2]))

    def digest(self) -> bytes:
        """The state's fingerprint: SHA-256 over the CRC-32 of each block.

        It detects a page that differs, was lost or misplaced (not a forger:
        the stream is authenticated, if at all, by its transport).  A block
        whose CRC the stream already computed (its whole-block PAGE chunk,
        and no change since) is not read again, so a state is scanned once
        per migration on each side, not twice."""
        for block, crc in enumerate(self._crcs):
            if crc is None:
                self._crcs[block] = zlib.crc32(self.pages_at(block * BLOCK_PAGES, self.block_pages(block)))
        return hashlib.sha256(array.array("I", self._crcs).tobytes()).digest()
