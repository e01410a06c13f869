"""The reference device's migration data: what flows through data_fd (v2)
or the migration region's data window (v1).

The uAPI leaves the stream opaque to userspace; this device makes it
self-checking so that a destination never loads what it should refuse
(seed 003: a corrupted migration may fail, but must not corrupt):

- a QHDR chunk first, naming the device model, stream version and the
  configuration the state belongs to; a destination of another model,
  version or configuration refuses it;
- then PAGE chunks (page index, 4 KiB of internal state) and one REGS chunk
  (registers and engine state, JSON);
- a DONE chunk last, carrying the number of chunks before it and the
  digest of the source's final internal state, which the destination
  recomputes after loading.

Every chunk is ``<4sIQI`` (tag, payload length, argument, CRC-32 over the
other three fields and the payload) followed by the payload.  Bytes may be
cut anywhere between reads and writes (v2 keeps only the byte order).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

from ..errors import StreamError

CHUNK = struct.Struct("<4sIQI")
VERSION = 1
MODEL = "qmpmig-reference-dma"
MAX_PAYLOAD = 1 << 20
TAGS = (b"QHDR", b"PAGE", b"REGS", b"DONE")


@dataclass(frozen=True)
class Chunk:
    tag: bytes
    arg: int
    payload: bytes


def _crc(tag: bytes, arg: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<4sQI", tag, arg, len(payload))))


def encode(tag: bytes, arg: int, payload: bytes) -> bytes:
    return CHUNK.pack(tag, len(payload), arg, _crc(tag, arg, payload)) + payload


def header(config: dict) -> bytes:
    body = {"model": MODEL, "version": VERSION, "config": config}
    return encode(b"QHDR", 0, json.dumps(body, sort_keys=True).encode())


class StreamReader:
    """Incremental decoder for one resume: feed bytes, get chunks; raises
    StreamError (and stays failed) on anything it must not load."""

    def __init__(self, config: dict):
        self.config = config
        self._buf = bytearray()
        self.chunks = 0
        self.done: Chunk | None = None
        self.error: str | None = None

    def feed(self, data: bytes) -> list[Chunk]:
        if self.error:
            raise StreamError(self.error)
        try:
            return self._feed(data)
        except StreamError as err:
            self.error = str(err)
            raise

    def _feed(self, data: bytes) -> list[Chunk]:
        if self.done and data:
            raise StreamError("data after the end of the stream")
        self._buf += data
        out = []
        while len(self._buf) >= CHUNK.size:
            tag, length, arg, crc = CHUNK.unpack_from(self._buf)
            if tag not in TAGS:
                raise StreamError(f"chunk {self.chunks}: unknown tag {tag!r}")
            if length > MAX_PAYLOAD:
                raise StreamError(f"chunk {self.chunks}: length {length} too large")
            if len(self._buf) < CHUNK.size + length:
                break
            payload = bytes(self._buf[CHUNK.size:CHUNK.size + length])
            del self._buf[:CHUNK.size + length]
            if _crc(tag, arg, payload) != crc:
                raise StreamError(f"chunk {self.chunks} ({tag.decode()}): checksum mismatch")
            chunk = Chunk(tag, arg, payload)
            self._check(chunk)
            self.chunks += 1
            out.append(chunk)
            if tag == b"DONE":
                self.done = chunk
                if self._buf:
                    raise StreamError("data after the end of the stream")
        return out

    def _check(self, chunk: Chunk) -> None:
        if self.chunks == 0:
            if chunk.tag != b"QHDR":
                raise StreamError("stream does not start with a qmpmig device header")
            try:
                head = json.loads(chunk.payload)
            except ValueError as err:
                raise StreamError(f"unreadable header: {err}") from None
            if head.get("model") != MODEL:
                raise StreamError(f"stream is for device model {head.get('model')!r}, this is {MODEL!r}")
            if head.get("version") != VERSION:
                raise StreamError(f"stream version {head.get('version')!r}, this device reads {VERSION}")
            if head.get("config") != self.config:
                raise StreamError(f"stream configuration {head.get('config')} differs from this device's {self.config}")
        elif chunk.tag == b"QHDR":
            raise StreamError(f"chunk {self.chunks}: a second header")
        elif chunk.tag == b"DONE" and chunk.arg != self.chunks:
            raise StreamError(f"stream ended after {self.chunks} chunks, the source sent {chunk.arg}")

    def finish(self) -> Chunk:
        """The DONE chunk; StreamError if the stream stopped short."""
        if self.error:
            raise StreamError(self.error)
        if self.done is None:
            self.error = f"truncated stream: {self.chunks} chunks and {len(self._buf)} bytes, no end marker"
            raise StreamError(self.error)
        return self.done
