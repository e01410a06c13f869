"""Bytes that arrive in pieces and are taken off the front in frames.

Both framed streams of qmpmig read this way: vfio-user messages off a
socket (:mod:`qmpmig.vfio_user.codec`) and the reference device's chunks off
its migration stream (:mod:`qmpmig.device.savestream`).  A frame that lies
in one piece is handed out as a view of it, not copied; one that a read cut
apart is joined, once.  Migration data is a MiB per frame, so this is where
a copy costs.
"""

from __future__ import annotations

from collections import deque


class ByteQueue:
    """A FIFO of received bytes, read from the front."""

    def __init__(self) -> None:
        self._pieces: deque[bytes | memoryview] = deque()
        #: Bytes buffered.
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, data: bytes | memoryview) -> None:
        """Buffer ``data`` (not copied: it must not change afterwards)."""
        if len(data):
            self._pieces.append(data)
            self.size += len(data)

    def front(self, size: int) -> memoryview:
        """The first ``size`` bytes (at most :attr:`size`) in one buffer,
        left in the queue."""
        first = self._pieces[0]
        if len(first) < size:
            parts, have = [], 0
            while have < size:
                parts.append(self._pieces.popleft())
                have += len(parts[-1])
            first = b"".join(parts)
            self._pieces.appendleft(first)
        return memoryview(first)[:size]

    def take(self, size: int) -> memoryview:
        """The first ``size`` bytes, removed from the queue."""
        frame = self.front(size)
        self.skip(size)
        return frame

    def take_parts(self, size: int) -> list[memoryview]:
        """The first ``size`` bytes, removed from the queue, as the views of
        the pieces they came in: never copied."""
        parts = []
        while size:
            piece = memoryview(self._pieces.popleft())
            if len(piece) > size:
                self._pieces.appendleft(piece[size:])
                piece = piece[:size]
            parts.append(piece)
            size -= len(piece)
            self.size -= len(piece)
        return parts

    def skip(self, size: int) -> None:
        """Drop the first ``size`` bytes, which :meth:`front` joined."""
        first = self._pieces.popleft()
        if len(first) > size:
            self._pieces.appendleft(memoryview(first)[size:])
        self.size -= size
